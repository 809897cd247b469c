"""Request bodies to prompt token ids: chat messages through the model's chat template (reusing
the ids of a recent prompt that shares the history), plain completions through the tokenizer
(with its special tokens, e.g. BOS, as `generate` would)."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from ktinject.engine import Engine
from ktinject.errors import KtinjectError
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
    engine: Engine, tokenizer: Any, prompt: str | list[int] | list[str] | list[list[int]]
) -> list[int]:
    """Text through the tokenizer; token ids as given, once the engine has checked them against
    the model's vocabulary (refused here, the 400 names `prompt`)."""
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
    if prompt:
        try:
            engine.check_token_ids(prompt)
        except KtinjectError as exc:
            raise RequestError(str(exc), param="prompt") from None
    return list(prompt)
