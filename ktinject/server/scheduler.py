"""Slots and continuous batching: the only code that touches the engine while the server runs.

The engine is not thread-safe, so one worker thread owns it. HTTP handlers `submit` requests and
`cancel` them (both thread-safe); the worker loops:

1. drop cancelled requests and free their slots;
2. place waiting requests (FIFO) on free slots: the free slot whose cached token ids share the
   longest prefix with the prompt (least recently used among ties), so the next turn of a
   conversation lands where its history is cached -- but only a slot of which the request reuses
   at least `MIN_REUSED_FRACTION` of the tokens; otherwise the least recently used free slot
   (never-used slots first). Without that threshold a new conversation that shares only the
   chat template's or a system prompt's first tokens with the latest conversation would take
   its slot and destroy its history while empty slots are left;
3. prefill **one chunk** (`engine.chunk_size` tokens) of the oldest request still prefilling: a
   long prompt is spread over several iterations, so running streams keep producing tokens
   (chunks are successive prefixes of the prompt; `engine.prefill` keeps what the slot already
   holds, so each call computes only the new chunk);
4. decode one token for every request past prefill, all slots in one batched step. The step is
   queued with the tokens sampled by the previous one still on the device
   (`engine.decode_sampled`), and those tokens are read back and streamed while it runs, so the
   host's per-token work (detokenizing, stop checks, events) overlaps the device's step. A
   request that ends on such a token has had one extra row computed; its K/V stays cached.

A finished request leaves its prompt and answer in the slot's cache for the next turn. An
exception is confined to the requests it concerns: their slots are reset and they get a `Failed`
event; the loop keeps serving.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque

import torch

from ktinject.completion import sample_rows
from ktinject.devices import host_ints_to
from ktinject.engine import Engine
from ktinject.errors import KtinjectError
from ktinject.server.metrics import ServerMetrics
from ktinject.server.sequence import Sequence

log = logging.getLogger("ktinject.server")

MIN_REUSED_FRACTION = 0.5


class Scheduler:
    """Owns the engine on a worker thread; see the module docstring for the loop."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, *, prefix_reuse: bool) -> None:
        self.engine = engine
        self.metrics = metrics
        self.prefix_reuse = prefix_reuse
        self.slots: list[Sequence | None] = [None] * engine.num_slots
        self.last_used = [0] * engine.num_slots  # tick of the last release, for LRU
        self.ticks = itertools.count(1)
        self.waiting: deque[Sequence] = deque()
        # requests whose next input token is sampled but not yet read: row of `self.sampled`
        self.in_flight: dict[Sequence, int] = {}
        self.sampled: torch.Tensor | None = None
        self.inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self.stopping = False
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ktinject-scheduler", daemon=True)

    # -- called from other threads ----------------------------------------------------------

    def start(self) -> None:
        """Start the worker; returns once it has warmed up and is ready for requests."""
        self.thread.start()
        self.ready.wait()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping = True
        self.inbox.put(None)
        self.thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        self.inbox.put(seq)

    def cancel(self, seq: Sequence) -> None:
        """Drop `seq` at the next iteration (its slot is freed then); a no-op once finished."""
        seq.cancelled = True
        self.inbox.put(None)  # wake the worker if it is idle

    # -- worker thread ----------------------------------------------------------------------

    @property
    def running(self) -> list[Sequence]:
        return [seq for seq in self.slots if seq is not None]

    def _run(self) -> None:
        try:
            self._warm_up()
        except Exception:  # serve anyway: a broken engine then fails requests one by one
            log.exception("warm-up failed")
        self.ready.set()
        while not self.stopping:
            self._take_inbox(block=not (self.waiting or self.running))
            try:
                self._step()
            except Exception as exc:  # a bug here must not kill the worker
                log.exception("scheduler step failed")
                for seq in self.running:
                    self._fail(seq, exc)
        for seq in [*self.running, *self.waiting]:
            seq.fail(RuntimeError("The server is shutting down."))

    def _warm_up(self) -> None:
        """Compile kernels and capture CUDA graphs before serving, so no request pays for them."""
        self.engine.warm_up()

    def _take_inbox(self, *, block: bool) -> None:
        try:
            item = self.inbox.get(block=block)
            while True:
                if item is not None:
                    self.waiting.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        prefilling = [seq for seq in self.running if seq.prefilling]
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda seq: seq.arrived))
        decoding = [seq for seq in self.running if seq.pending is not None or seq in self.in_flight]
        if decoding:
            self._decode(decoding)

    def _drop_cancelled(self) -> None:
        if any(seq.cancelled for seq in self.waiting):
            self.waiting = deque(seq for seq in self.waiting if not seq.cancelled)
            self.metrics.waiting.set(len(self.waiting))
        for seq in self.running:
            if seq.cancelled:
                self._release(seq)

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            seq = self.waiting.popleft()
            slot, shared = self._pick_slot(seq.prompt_ids)
            seq.slot = slot
            seq.prefilled = seq.cached_tokens = min(shared, len(seq.prompt_ids) - 1)
            self.slots[slot] = seq
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
            self.metrics.prefix_queries.inc(len(seq.prompt_ids))
            self.metrics.prefix_hits.inc(seq.cached_tokens)
        self.metrics.waiting.set(len(self.waiting))
        self.metrics.slots_in_use.set(len(self.running))

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """(slot, tokens of `prompt` it already holds) -- the policy in the module docstring."""
        free = [slot for slot, seq in enumerate(self.slots) if seq is None]
        lru = min(free, key=lambda slot: self.last_used[slot])
        if not self.prefix_reuse:
            return lru, 0
        shared = {slot: self.engine.shared_prefix(slot, prompt) for slot in free}
        worth = [
            slot
            for slot in free
            if shared[slot] > 0
            and shared[slot] >= MIN_REUSED_FRACTION * len(self.engine.cached_tokens(slot))
        ]
        best = max(worth, key=lambda s: (shared[s], -self.last_used[s]), default=lru)
        return best, shared[best]

    def _prefill_chunk(self, seq: Sequence) -> None:
        end = min(len(seq.prompt_ids), seq.prefilled + self.engine.chunk_size)
        try:
            # reuse=False on the first chunk without prefix reuse wipes the slot's history
            logits, _ = self.engine.prefill(seq.slot, seq.prompt_ids[:end], reuse=seq.prefilled > 0)
            seq.prefilled = end
            if not seq.prefilling:
                self._accept(seq, seq.completion.sample(logits))
        except Exception as exc:
            self._fail(seq, exc)

    def _decode(self, batch: list[Sequence]) -> None:
        self.metrics.decode_batch.observe(len(batch))
        in_flight, self.in_flight = self.in_flight, {}
        try:
            ids = self._input_ids(batch, in_flight)
            logits, fed = self.engine.decode_sampled([s.slot for s in batch], ids)
        except Exception as exc:  # cannot tell whose fault: every row of the step fails
            for seq in batch:
                self._fail(seq, exc)
            return
        for seq, token in zip(batch, fed, strict=True):
            if seq in in_flight:  # read just now; rows from a prefill were accepted then
                try:
                    self._accept(seq, token)
                except Exception as exc:
                    self._fail(seq, exc)
        going = [row for row, seq in enumerate(batch) if not seq.finished]
        if not going:
            return
        try:
            rows = logits
            if len(going) < len(batch):
                rows = logits.index_select(0, host_ints_to(going, logits.device))
            self.sampled = sample_rows([batch[row].completion for row in going], rows)
        except Exception as exc:
            for row in going:
                self._fail(batch[row], exc)
            return
        for index, row in enumerate(going):
            batch[row].pending = None
            self.in_flight[batch[row]] = index

    def _input_ids(self, batch: list[Sequence], in_flight: dict[Sequence, int]) -> torch.Tensor:
        """The step's input ids on the device: rows sampled by the previous step stay there,
        rows fresh from prefill (`pending`) come from the host."""
        rows = [in_flight.get(seq) for seq in batch]
        if self.sampled is not None and rows == list(range(len(self.sampled))):
            return self.sampled  # the usual case: the same requests as the previous step
        device = self.engine.device
        ids = host_ints_to([seq.pending or 0 for seq in batch], device)
        kept = [index for index, row in enumerate(rows) if row is not None]
        if kept:
            taken = self.sampled.index_select(0, host_ints_to([rows[i] for i in kept], device))
            ids.index_copy_(0, host_ints_to(kept, device), taken)
        return ids

    def _accept(self, seq: Sequence, token: int) -> None:
        first, before = seq.first_token_at is None, seq.completion_tokens
        seq.accept(token)
        self.metrics.generation_tokens.inc(seq.completion_tokens - before)
        if first:
            self.metrics.ttft.observe(seq.first_token_at - seq.arrived)
        if seq.finished:
            if seq.completion_tokens > 1:
                elapsed = time.perf_counter() - seq.first_token_at
                self.metrics.tpot.observe(elapsed / (seq.completion_tokens - 1))
            self._release(seq)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """The slot's cache may be half-written: forget it, then report the error."""
        if not isinstance(exc, KtinjectError):
            log.error("request failed", exc_info=exc)
        self.engine.reset(seq.slot)
        self._release(seq)
        if not seq.finished:
            seq.fail(exc)

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
            self.last_used[seq.slot] = next(self.ticks)
        self.metrics.slots_in_use.set(len(self.running))
