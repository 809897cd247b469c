"""Errors a user can act on.

Every error ktinject raises on bad input derives from `KtinjectError` and carries one sentence that
names the offending value, the limit, and the flag or key to change. The CLI prints that sentence
and exits non-zero; the server turns it into an HTTP 400. Nothing here ever calls `exit()`.
"""

from __future__ import annotations


class KtinjectError(Exception):
    """Base of all user-facing ktinject errors."""


class RuleError(KtinjectError):
    """A rule file or an override is invalid (bad YAML, unknown key, bad regex, bad class...)."""


class DeviceError(RuleError):
    """A rule or flag names a device that does not exist on this machine."""


class UnmatchedRuleError(RuleError):
    """Under `--strict`, a rule matched no module of the model."""


class ModelSourceError(KtinjectError):
    """A model source cannot be resolved or loaded (missing path, unsupported GGUF, no wheel)."""


class ContextLengthError(KtinjectError):
    """A prompt (plus reused history and new tokens) does not fit in the KV cache, or, in local
    mode, in the model's context window (`window=True`)."""

    def __init__(
        self,
        *,
        prompt_tokens: int,
        max_new_tokens: int,
        cache_lens: int,
        window: bool = False,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.cache_lens = cache_lens
        if window:
            holder = f"the model's context window is {cache_lens:,} positions"
            grow = "use a model with a longer max_position_embeddings"
        else:
            holder = f"the KV cache holds {cache_lens:,} positions"
            grow = "raise --cache-lens (cache_lens)"
        if prompt_tokens >= cache_lens:
            message = (
                f"The prompt has {prompt_tokens:,} tokens but {holder} (and at least one more "
                f"is needed to answer); shorten the prompt or {grow}."
            )
        else:
            message = (
                f"The prompt has {prompt_tokens:,} tokens and {max_new_tokens:,} new tokens were "
                f"requested, {prompt_tokens + max_new_tokens:,} in all, but {holder}; lower "
                f"--max-new-tokens (max_tokens) to at most {cache_lens - prompt_tokens:,} or "
                f"{grow}."
            )
        super().__init__(message)
