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
cache positions like any other.
"""

from __future__ import annotations

from ktinject.engine import Engine


def max_new_tokens_for(
    engine: Engine, prompt_tokens: int, requested: int | None, *, default: int, strict: bool
) -> int:
    """How many tokens this request may generate; raises `ContextLengthError` as the module
    docstring says (the engine's check, so the message names the numbers and the fix)."""
    engine.check_request(prompt_tokens, 1)
    if strict and requested is not None:
        engine.check_request(prompt_tokens, requested)
    wanted = default if requested is None else requested
    return min(wanted, engine.cache_lens - prompt_tokens)
