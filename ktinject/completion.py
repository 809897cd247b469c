"""From sampled token ids to streamed text, and when to stop — one place for every front end.

`engine.generate` (run, chat, bench) and the server's scheduler both feed sampled tokens to a
`Completion`, so they stop on exactly the same conditions: an end-of-sequence id, a stop string
(never shown), or `max_new_tokens`; and they stream the same text (never half a character, text
that might begin a stop string held back until ruled out).
"""

from __future__ import annotations

from typing import Any

import torch

from ktinject.detokenize import StreamDecoder
from ktinject.devices import host_ints_to
from ktinject.sampling import make_generator, sample
from ktinject.settings import SamplingParams
from ktinject.stopping import StopMatcher


class Completion:
    """The generated part of one request. `finish_reason` is set ("stop" or "length") once a
    token ends it; the token ids exclude the end-of-sequence id."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        tokenizer: Any,
        eos_ids: set[int],
        device: torch.device,
    ) -> None:
        self.params = params
        self.eos_ids = set() if params.ignore_eos else eos_ids
        self.generator = make_generator(params, device)
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stopper = StopMatcher(params.stop)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    def sample(self, logits: torch.Tensor) -> int:
        """Pick the next token from one row of logits [V]."""
        return int(self.sample_on_device(logits)[0])

    def sample_on_device(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick the next token from one row of logits [V], left on their device as [1] (for
        `Engine.decode_sampled`, which reads it back while the next step runs)."""
        return sample(logits[None], self.params, self.generator)

    def accept(self, token: int) -> str:
        """Take one sampled token; return the text that may be shown now (maybe empty)."""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._tail()
        self.token_ids.append(token)
        text, stopped = self.stopper.feed(self.decoder.push(token) if self.decoder else "")
        if stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            text += self._tail()
        return text

    def _tail(self) -> str:
        """Text still held back at the end: it was not a stop string after all."""
        flushed = self.decoder.flush() if self.decoder else ""
        tail, _ = self.stopper.feed(flushed)
        return tail + self.stopper.flush()


def sample_rows(completions: list[Completion], logits: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` [B, V] for the request of that row, left on the device [B].
    Nothing is read back, so a batched decode loop reads all rows at once (or not at all).

    Greedy rows take one batched argmax. Rows that sample with the same settings and no seed are
    drawn together: sampling a row is ~6 kernels (with top-p ~15), each a launch of host time
    on a GPU, so a step of 8 rows sampled one by one cost about as much host time as the decode
    step itself. A seeded row keeps its own generator, so its draws never depend on which other
    requests share the step."""
    seeded: list[int] = []
    together: dict[tuple[float, float, int], list[int]] = {}
    for row, completion in enumerate(completions):
        params = completion.params
        if params.greedy:
            continue
        if completion.generator is not None:
            seeded.append(row)
        else:
            together.setdefault((params.temperature, params.top_p, params.top_k), []).append(row)
    if not seeded and [len(rows) for rows in together.values()] == [len(completions)]:
        return sample(logits, completions[0].params)  # every row alike: no argmax needed
    tokens = logits.argmax(dim=-1)
    for row in seeded:
        tokens[row] = completions[row].sample_on_device(logits[row])[0]
    for rows in together.values():
        index = host_ints_to(rows, logits.device)
        sampled = sample(logits.index_select(0, index), completions[rows[0]].params)
        tokens.index_copy_(0, index, sampled)
    return tokens
