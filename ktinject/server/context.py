"""Context policy: how a request's prompt and max_tokens are fitted into one KV cache slot.

Every slot holds `--cache-lens` token positions: the whole conversation (history + new prompt)
plus the answer must fit. The policy is applied after the chat template, before the request is
queued, so a rejected request gets a plain HTTP 400 (no stream is opened):

- **Prompt too long** -- prompt tokens >= cache_lens (no room left for even one new token): HTTP
  400 with `code: "context_length_exceeded"`, naming the prompt length and the cache size.
- **Answer would overflow** -- the prompt fits but prompt + max_tokens > cache_lens: max_tokens is
  clamped to `cache_lens - prompt_tokens`; if generation reaches that limit it ends with
  `finish_reason: "length"`. Under `--strict-context` the request is rejected instead (HTTP 400,
  `context_length_exceeded`, naming how many new tokens would fit).
- **No max_tokens** (nor max_completion_tokens) -- the server default (`--max-new-tokens`,
  1024) applies, capped the same way; this is never an error.

Reused history does not change these numbers: cached tokens are part of the prompt and occupy
cache positions like any other. The messages speak to the caller, who can change the request's
fields but not the server's `--cache-lens`.
"""

from __future__ import annotations

from ktinject.engine import Engine
from ktinject.errors import ContextLengthError
from ktinject.server.errors import RequestError

CODE = "context_length_exceeded"


def max_new_tokens_for(
    engine: Engine,
    prompt_tokens: int,
    requested: int | None,
    *,
    default: int,
    strict: bool,
    prompt_param: str,
    tokens_param: str,
) -> int:
    """How many tokens this request may generate. The engine's own check decides what fits;
    its refusal is told to the caller as the module docstring says, blaming `prompt_param` or
    `tokens_param` (the field the request used)."""
    try:
        engine.check_request(prompt_tokens, requested if strict and requested else 1)
    except ContextLengthError as exc:
        if exc.prompt_tokens >= exc.cache_lens:
            raise prompt_too_long(f"{prompt_tokens:,}", exc.cache_lens, prompt_param) from None
        room = exc.cache_lens - prompt_tokens
        raise RequestError(
            f"The prompt has {prompt_tokens:,} tokens and {tokens_param} is {requested:,}, "
            f"{prompt_tokens + requested:,} in all, but this server holds {exc.cache_lens:,} "
            f"tokens per conversation (its --cache-lens); set {tokens_param} to at most "
            f"{room:,}.",
            param=tokens_param,
            code=CODE,
        ) from None
    return min(default if requested is None else requested, engine.cache_lens - prompt_tokens)


def prompt_too_long(tokens: str, cache_lens: int, param: str) -> RequestError:
    """The 400 of a prompt with `tokens` tokens (a number, or "at least N") that leaves no room
    for an answer in a slot of `cache_lens` positions."""
    return RequestError(
        f"The prompt has {tokens} tokens, but this server holds {cache_lens:,} tokens per "
        f"conversation (its --cache-lens), prompt and answer together; shorten {param}.",
        param=param,
        code=CODE,
    )
