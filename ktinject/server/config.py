"""What the HTTP layer needs to know beyond the engine: its name, limits and policies."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class ServeConfig:
    """Server policy. `max_new_tokens` is used when a request gives no max_tokens (still capped to
    what fits in the cache); `strict_context` rejects an over-long max_tokens instead of clamping
    it; `prefix_reuse` places requests by shared history and prefills only the new suffix."""

    model_name: str = "ktinject"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    strict_context: bool = False
    prefix_reuse: bool = True
    api_key: str | None = None
