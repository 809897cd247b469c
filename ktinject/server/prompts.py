"""Request bodies to prompt token ids: chat messages through the model's chat template (reusing
the ids of a recent prompt that shares the history), plain completions through the tokenizer
(with its special tokens, e.g. BOS, as `generate` would)."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from ktinject.prompt_tokens import PromptTokenizer
from ktinject.server.errors import RequestError
from ktinject.server.schemas import ChatMessage


def chat_prompt(prompts: PromptTokenizer, messages: list[ChatMessage]) -> list[int]:
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return prompts.chat_ids(plain)
    except (ValueError, TemplateError) as exc:
        raise RequestError(
            f"The model's chat template cannot render these messages ({exc}); fix the messages "
            f"or use /v1/completions with a plain prompt.",
            param="messages",
        ) from None


def completion_prompt(
    tokenizer: Any, prompt: str | list[int] | list[str] | list[list[int]]
) -> list[int]:
    """Text through the tokenizer; token ids as given, once checked against the vocabulary
    (an id past it would fail inside the embedding, not as a 400)."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise RequestError(
                f"prompt holds {len(prompt)} prompts; this server takes one per request (send "
                "them as separate requests, which it decodes together).",
                param="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    vocab = len(tokenizer)
    outside = [token for token in prompt if not 0 <= token < vocab]
    if outside:
        raise RequestError(
            f"prompt token id {outside[0]} is outside the vocabulary [0, {vocab}); send ids of "
            "this model's tokenizer.",
            param="prompt",
        )
    return list(prompt)
