"""Request bodies to prompt token ids: chat messages through the model's chat template (reusing
the ids of a recent prompt that shares the history), plain completions through the tokenizer
(with its special tokens, e.g. BOS, as `generate` would).

Text is checked before it is tokenized: a lone surrogate (half an emoji, cut by a client) is
refused with the field's name instead of failing inside the tokenizer, and a text far longer
than the KV cache can hold is measured on its head only. Tokenized whole, a 200 MB prompt grew
the server past 23 GB until the kernel killed it, and a 20 MB one took 54 s to refuse while it
held every other request's prompt behind it (2-core EPYC, 2026-11-29); now 0.3 s for 20 MB.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from ktinject.engine import Engine
from ktinject.errors import KtinjectError
from ktinject.prompt_tokens import PromptTokenizer
from ktinject.server.context import prompt_too_long
from ktinject.server.errors import RequestError
from ktinject.server.schemas import ChatMessage

# Real text averages 3-5 characters a token; a text with more characters than this many per
# cache position is tokenized whole only if its head does not already fill the cache.
HEAD_CHARS_PER_TOKEN = 16
# Tokens a cut through the head's last word can add that the whole text does not have.
CUT_TOKENS = 64


def chat_prompt(
    prompts: PromptTokenizer, messages: list[ChatMessage], cache_lens: int
) -> list[int]:
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = prompts.render(plain)
    except (ValueError, TemplateError) as exc:
        raise RequestError(
            f"The model's chat template cannot render these messages ({exc}); fix the messages "
            f"or use /v1/completions with a plain prompt.",
            param="messages",
        ) from None
    check_text(prompts.tokenizer, text, cache_lens, "messages")
    return prompts.encode(text)


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
        check_text(tokenizer, prompt, engine.cache_lens, "prompt")
        return list(tokenizer(prompt)["input_ids"])
    if prompt:
        try:
            engine.check_token_ids(prompt)
        except KtinjectError as exc:
            raise RequestError(str(exc), param="prompt") from None
    return list(prompt)


def check_text(tokenizer: Any, text: str, cache_lens: int, param: str) -> None:
    """Refuse `text` (the prompt of field `param`) if it is not valid Unicode, or if its head
    alone already has too many tokens for a slot of `cache_lens` positions."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"{param} holds a lone surrogate (U+{ord(text[exc.start]):04X}, half of a character "
            f"such as an emoji) at character {exc.start:,} of the prompt; send whole characters.",
            param=param,
        ) from None
    head = cache_lens * HEAD_CHARS_PER_TOKEN
    if len(text) <= head:
        return
    tokens = len(tokenizer(text[:head], add_special_tokens=False)["input_ids"]) - CUT_TOKENS
    if tokens >= cache_lens:
        raise prompt_too_long(f"at least {tokens:,}", cache_lens, param)
