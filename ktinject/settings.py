"""What a user asks the engine for (sampling, cache sizes), checked without torch: the CLI
refuses a bad flag in a fraction of a second instead of after importing torch and loading a
model."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from ktinject.errors import KtinjectError

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    """What to generate. `temperature == 0` means greedy (and ignores top-k/top-p/seed)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.max_new_tokens = integer("max_new_tokens", self.max_new_tokens)
        self.temperature = number("temperature", self.temperature)
        self.top_p = number("top_p", self.top_p)
        self.top_k = integer("top_k", self.top_k)
        if self.seed is not None:
            self.seed = integer("seed", self.seed)
        self.stop = stop_strings(self.stop)
        if not isinstance(self.ignore_eos, bool):
            raise KtinjectError(f"ignore_eos is {self.ignore_eos!r}; it must be True or False.")
        if self.max_new_tokens < 1:
            raise KtinjectError(
                f"max_new_tokens is {self.max_new_tokens}; it must be at least 1 "
                f"(--max-new-tokens)."
            )
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise KtinjectError(
                f"temperature is {self.temperature}; it must be a finite number >= 0 "
                f"(--temperature)."
            )
        if not 0 < self.top_p <= 1:
            raise KtinjectError(f"top_p is {self.top_p}; it must be in (0, 1] (--top-p).")
        if self.top_k < 0:
            raise KtinjectError(
                f"top_k is {self.top_k}; it must be >= 0, where 0 turns it off (--top-k)."
            )
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise KtinjectError(
                f"seed is {self.seed}; it must be from -2**63 to 2**64 - 1 (--seed)."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def integer(name: str, value: Any) -> int:
    """`value` as a plain int (numpy integers too), or one sentence: a float would be truncated
    somewhere later, and a bool is no count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise KtinjectError(
            f"{name} is {value!r} ({type(value).__name__}); it must be an integer (int)."
        )
    return int(value)


def number(name: str, value: Any) -> float:
    """`value` as a float, or one sentence (a str or None would fail inside torch)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise KtinjectError(
            f"{name} is {value!r} ({type(value).__name__}); it must be a number, e.g. {name}=1.0."
        )
    return float(value)


def stop_strings(stop: Any) -> list[str]:
    """Stop strings as a list: one string is one stop string (as in OpenAI's API), not its
    characters; None is none."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list | tuple) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise KtinjectError(
        f"stop is {stop!r}; it must be a string or a list of strings, e.g. stop=['END']."
    )


def check_cache_settings(cache_lens: int | None, chunk_size: int) -> None:
    """The engine's own settings, checked by `Engine` and by the CLI before a model loads."""
    chunk_size = integer("chunk_size", chunk_size)
    if cache_lens is not None:
        cache_lens = integer("cache_lens", cache_lens)
    if chunk_size < 1:
        raise KtinjectError(f"chunk_size is {chunk_size}; it must be at least 1 (--chunk-size).")
    if cache_lens is not None and cache_lens < 2:
        raise KtinjectError(f"cache_lens is {cache_lens}; it must be at least 2 (--cache-lens).")
