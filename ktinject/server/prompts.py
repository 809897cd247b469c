"""Request bodies to prompt token ids: chat messages through the model's chat template, plain
completions through the tokenizer (with its special tokens, e.g. BOS, as `generate` would)."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from ktinject.chat import chat_prompt_ids
from ktinject.server.errors import RequestError
from ktinject.server.schemas import ChatMessage


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return chat_prompt_ids(tokenizer, plain)
    except (ValueError, TemplateError) as exc:
        raise RequestError(
            f"The model's chat template cannot render these messages ({exc}); fix the messages "
            f"or use /v1/completions with a plain prompt.",
            param="messages",
        ) from None


def completion_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])
