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


def completion_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])
