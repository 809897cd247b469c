"""One request as the scheduler sees it: its tokens, its sampling state, and the events it emits.

A `Sequence` feeds sampled token ids to a `Completion` (the same text/stop logic as
`engine.generate`) and reports what happened through a callback, so the scheduler never needs to
know about HTTP or asyncio and the HTTP side never touches the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ktinject.completion import Completion
from ktinject.settings import SamplingParams


@dataclass(frozen=True)
class Usage:
    """Token counts of one request; `cached_tokens` of the prompt came from the prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Delta:
    """New text, safe to show (stop strings are held back until ruled out)."""

    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class Failed:
    """The request died inside the scheduler; other requests are unaffected."""

    error: Exception


Event = Delta | Finished | Failed


class Sequence:
    """Generation state of one request, fed one sampled token at a time by the scheduler."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        tokenizer: Any,
        eos_ids: set[int],
        device: torch.device,
        emit: Callable[[Event], None],
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.emit = emit
        self.completion = Completion(params, tokenizer=tokenizer, eos_ids=eos_ids, device=device)
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens this request's slot holds so far
        self.cached_tokens = 0  # of those, how many were reused from an earlier request
        self.pending: int | None = None  # sampled, not yet fed to the model
        self.finished = False
        self.cancelled = False  # set from the HTTP side; the scheduler drops the request

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.completion.token_ids)

    def accept(self, token: int) -> None:
        """Take one sampled token: emit its text, or finish on EOS, a stop string or the limit."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        text = self.completion.accept(token)
        if text:
            self.emit(Delta(text))
        if self.completion.finish_reason is not None:
            self._finish(self.completion.finish_reason)
        else:
            self.pending = token

    def fail(self, error: Exception) -> None:
        self.finished = True
        self.emit(Failed(error))

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.pending = None
        usage = Usage(len(self.prompt_ids), self.completion_tokens, self.cached_tokens)
        self.emit(Finished(reason, usage))
