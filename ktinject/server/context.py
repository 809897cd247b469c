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

from ktinject.server.errors import RequestError

CODE = "context_length_exceeded"


def max_new_tokens_for(
    cache_lens: int,
    prompt_tokens: int,
    requested: int | None,
    *,
    default: int,
    strict: bool,
    prompt_param: str,
    tokens_param: str,
) -> int:
    """How many tokens this request may generate; raises `RequestError` as the module docstring
    says, blaming `prompt_param` or `tokens_param` (the field the request used)."""
    if prompt_tokens >= cache_lens:
        raise prompt_too_long(f"{prompt_tokens:,}", cache_lens, prompt_param)
    room = cache_lens - prompt_tokens
    if strict and requested is not None and requested > room:
        raise RequestError(
            f"The prompt has {prompt_tokens:,} tokens and {tokens_param} is {requested:,}, "
            f"{prompt_tokens + requested:,} in all, but this server holds {cache_lens:,} tokens "
            f"per conversation (its --cache-lens); set {tokens_param} to at most {room:,}.",
            param=tokens_param,
            code=CODE,
        )
    return min(default if requested is None else requested, room)


def prompt_too_long(tokens: str, cache_lens: int, param: str) -> RequestError:
    """The 400 of a prompt with `tokens` tokens (a number, or "at least N") that leaves no room
    for an answer in a slot of `cache_lens` positions."""
    return RequestError(
        f"The prompt has {tokens} tokens, but this server holds {cache_lens:,} tokens per "
        f"conversation (its --cache-lens), prompt and answer together; shorten {param}.",
        param=param,
        code=CODE,
    )
