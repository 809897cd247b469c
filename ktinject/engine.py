"""The generation engine: chunked prefill, decode (CUDA-graph captured on GPU), stopping.

Two cache back-ends, chosen from the model itself:
- *static*: the model has operators exposing `cache_spec()` (e.g. `StaticCacheAttention`); the
  engine owns a `StaticKVCache` of `cache_lens` positions per slot. With a fixed `cache_lens` the
  cache is allocated once (server, chat); otherwise it is sized per call to prompt + new tokens,
  rounded up to a page (local mode).
- *dynamic*: any other model (no rule file, or rules without attention operators) runs with
  Hugging Face's `DynamicCache`, one per slot.

Decode runs through a captured CUDA graph on GPU; on CPU, `compile=True` (`--compile`) runs it
through one `torch.compile` graph instead of ~20 eager ops per layer. On a CPU the engine also
turns the model's plain float32 `nn.Linear` modules into `operators.linear.DecodeLinear` (same
parameters; decode rows go through C dot kernels that stream weights faster than torch's GEMV:
~2.5x on an AVX-512 EPYC, ~1.8x for the head on an AVX2 one), which stays so for other uses of
the model, and prepares the decoder layers whose every part has a CPU kernel to decode in one
C++ call each (`operators.layer`). The engine reads the model's modules when it is built (its
compiled step too): build a new engine after replacing a module or a weight tensor.

`prefill` and `decode` / `decode_sampled` are the primitives the server batches; `generate` is
the single-sequence loop used by `run` and `chat` (and, step for step, by `bench`). Both loops
feed each step the token sampled by the previous one while it is still on the device
(`decode_sampled`), so on a GPU the host's per-token work overlaps the step. A decode graph is
captured per batch size, twice where the decoder layers can fold their norms into the
projections (`operators.triton.gemv`), and the faster replay is kept. A short prefill chunk
replays a decode graph too, one row per token (`Engine._prefill_rows`).
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ktinject.cache import (
    AttentionContext,
    StaticKVCache,
    check_cache_memory,
    local_cache_lens,
    use_context,
)
from ktinject.compiling import own_copy
from ktinject.completion import Completion
from ktinject.devices import host_ints_to
from ktinject.errors import ContextLengthError, KtinjectError
from ktinject.inject import is_meta
from ktinject.placement import model_devices
from ktinject.settings import SamplingParams, check_cache_settings, integer
from operators.layer import FusedResidualDecoderLayer, prepare_native_decode
from operators.linear import decode_linears
from operators.triton.gemv import MAX_ROWS, fused_gemv_pinned, prefer_fused_gemv

DEFAULT_CHUNK_SIZE = 8192
# Short prefill chunks replay a decode graph with one row per token (`Engine._prefill_rows`):
# the row counts captured, and the most cache bytes the rows' attention may read in one replay
# (each row reads its own prefix: rows x context x K/V bytes per position; 8 GiB is ~2 ms of
# H100/H200 HBM, against the ~35 ms of host work an eager prefill costs there).
PREFILL_GRAPH_ROWS = (16, 32, 64, 128)
PREFILL_GRAPH_READ_BYTES = 8 << 30
log = logging.getLogger("ktinject.engine")


@dataclass
class GenerationStats:
    """Counts and timings of one generation (what the CLI status line and `usage` report)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # one-time work this generation happened to pay (CUDA-graph capture, compiling the step),
    # kept out of prefill_s / decode_s so the rates say how fast the model runs
    setup_s: float = 0.0
    finish_reason: str | None = None

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.generated_tokens - 1  # the first token comes from prefill
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else 0.0


@dataclass
class Generation:
    """Iterate to stream text pieces; afterwards `text`, `token_ids` and `stats` are complete."""

    pieces: Iterator[str]
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)
    text: str = ""

    def __iter__(self) -> Iterator[str]:
        for piece in self.pieces:
            self.text += piece
            yield piece

    def result(self) -> str:
        """Run to completion and return the whole text."""
        for _ in self:
            pass
        return self.text


class Engine:
    """Runs a (patched) causal LM: one or more cache slots, chunked prefill, graph decode."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        cache_lens: int | None = None,
        num_slots: int = 1,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        cuda_graph: bool = True,
        compile: bool = False,  # noqa: A002 - the CLI's --compile
    ) -> None:
        check_engine_arguments(model, tokenizer, cuda_graph=cuda_graph, compile=compile)
        check_cache_settings(cache_lens, chunk_size)
        num_slots = integer("num_slots", num_slots)
        if num_slots < 1:
            raise KtinjectError(f"num_slots is {num_slots}; it must be at least 1.")
        self.model = model
        self.tokenizer = tokenizer
        self.num_slots = num_slots
        self.chunk_size = chunk_size
        # positions the model was built for: a longer cache could never be filled (a model with
        # learned positions would fail on an index), so it is cut to the window, and says so
        self.window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.cut_cache_note: str | None = None
        if cache_lens is not None and self.window is not None and cache_lens > self.window:
            self.cut_cache_note = (
                f"--cache-lens {cache_lens:,} is past the model's context window; the cache "
                f"holds its {self.window:,} positions (max_position_embeddings)"
            )
            cache_lens = self.window
        self.fixed_cache_lens = cache_lens
        embedding = model.get_input_embeddings().weight
        self.device, self.vocab_size = embedding.device, embedding.shape[0]
        self.specs = {
            m.layer_idx: m.cache_spec() for m in model.modules() if hasattr(m, "cache_spec")
        }
        decode_linears(model)  # CPU float32 projections decode through the C dot kernels
        # and eager float32 CPU decode runs each layer whose parts all have CPU kernels in one call
        self.native_layers = prepare_native_decode(model)
        self.graph_blocked_by = graph_blocker(model)  # why decode is not captured, if it is not
        self.graph_requested = cuda_graph
        self.cuda_graph = (
            cuda_graph and self.device.type == "cuda" and self.static and not self.graph_blocked_by
        )
        self.cache: StaticKVCache | None = None
        self.graphs: dict[int, _DecodeGraph] = {}
        self.prefill_graphs: dict[int, _DecodeGraph] = {}  # rows -> plain decode graph
        self.prefill_graphs_allowed = not any(
            getattr(m, "memory_grows_with_rows", False) for m in model.modules()
        )
        self.graph_pool: Any = None
        self.capture_s = 0.0
        self.fused_gemv_choice: dict[int, bool] = {}  # batch size -> graph with fused GEMVs
        # CPU decode through torch.compile (the CPU counterpart of the CUDA graph)
        self.compiled: CompiledDecode | None = None
        self.compile_blocked_by: str | None = None  # why compile=True has no effect, if so
        if compile:
            if self.cuda_graph:
                self.compile_blocked_by = "decode is a CUDA graph"
            elif not self.static:
                self.compile_blocked_by = "the rules give no static cache"
            else:
                self.compile_blocked_by = self.graph_blocked_by
            if self.compile_blocked_by is None:
                self.compiled = CompiledDecode(self)
        self.eos_ids = _eos_ids(model, tokenizer)
        if cache_lens is not None and self.specs:
            self._allocate(cache_lens)  # checks the memory first: before the slots' bookkeeping
        self.dynamic: list[Any] = [None] * num_slots
        self.dynamic_tokens: list[list[int]] = [[] for _ in range(num_slots)]
        # bumped whenever a slot's cache is cut (every prefill, every reset), so that a streaming
        # generation notices another call took its slot (`_check_still_mine`)
        self.slot_epochs = [0] * num_slots
        # where decode_sampled reads sampled ids back: pinned, so the copy does not block
        on_gpu = self.device.type == "cuda"
        self.readback = torch.zeros(num_slots, dtype=torch.long, pin_memory=on_gpu)
        self.readback_done = torch.cuda.Event() if on_gpu else None

    @property
    def static(self) -> bool:
        return bool(self.specs)

    @property
    def setup_s(self) -> float:
        """Seconds spent so far capturing CUDA graphs and compiling the decode step."""
        return self.capture_s + (self.compiled.compile_s if self.compiled is not None else 0.0)

    @property
    def cache_lens(self) -> int | None:
        """The cache size in force (None: dynamic cache, or nothing allocated yet)."""
        if self.fixed_cache_lens is not None:
            return self.fixed_cache_lens
        return self.cache.cache_lens if self.cache is not None else None

    def cached_length(self, slot: int) -> int:
        return self._length(self.check_slot(slot))

    def _length(self, slot: int) -> int:
        """`cached_length` of a slot already checked (the engine's own per-step reads)."""
        if self.cache is not None:
            return self.cache.lengths[slot]
        return len(self.dynamic_tokens[slot])

    def cached_tokens(self, slot: int) -> list[int]:
        slot = self.check_slot(slot)
        return self.cache.tokens[slot] if self.cache is not None else self.dynamic_tokens[slot]

    def check_slot(self, slot: Any) -> int:
        """`slot` as an int, or one sentence: a negative slot would wrap around to another
        sequence's cache, a float or one past the end fail inside the bookkeeping."""
        if (
            isinstance(slot, bool)
            or not isinstance(slot, numbers.Integral)
            or not 0 <= slot < self.num_slots
        ):
            raise KtinjectError(
                f"slot {slot!r} is not a slot of this engine, whose {self.num_slots} slot(s) are "
                f"0 to {self.num_slots - 1}; give one of those, or build the engine with more "
                "(Engine(num_slots=...))."
            )
        return int(slot)

    def check_step(self, slots: Any, count: int) -> list[int]:
        """The slots of one decode step, fed `count` tokens, checked before anything changes:
        each slot once (a slot given twice would write both tokens at the same position), one
        token per slot."""
        if not isinstance(slots, list | tuple) or not slots:
            raise KtinjectError(
                f"slots is {slots!r}; a decode step takes a non-empty list of slots, e.g. [0]."
            )
        checked = [self.check_slot(s) for s in slots]
        if len(set(checked)) < len(checked):
            twice = next(s for s in checked if checked.count(s) > 1)
            raise KtinjectError(
                f"slot {twice} appears more than once in one decode step; give each slot once "
                "(one token per slot per step)."
            )
        if len(checked) != count:
            raise KtinjectError(
                f"A decode step got {len(checked)} slot(s) and {count} token id(s); give one "
                "token id per slot."
            )
        return checked

    def _allocate(self, cache_lens: int) -> None:
        """(Re)allocate the static cache; a larger one keeps what the old one held. Always as
        plain tensors, whichever mode the caller runs in (local mode grows the cache from
        `generate` or from inside `prefill`): the compiled decode step guards on that mode and
        would compile again for a cache allocated in the other one."""
        self._check_memory(cache_lens)
        old, self.cache = self.cache, None
        self.graphs.clear()
        self.prefill_graphs.clear()
        with torch.inference_mode(False):
            self.cache = StaticKVCache(
                self.specs,
                num_slots=self.num_slots,
                cache_lens=cache_lens,
                max_rows=PREFILL_GRAPH_ROWS[-1] if self.cuda_graph else None,
            )
            if old is not None:
                self.cache.copy_from(old)

    def _check_memory(self, cache_lens: int) -> None:
        if self.fixed_cache_lens is None:
            fix = "shorten the prompt or lower --max-new-tokens"
        else:
            fix = "lower --cache-lens" + (" or --max-batch-size" if self.num_slots > 1 else "")
        check_cache_memory(self.specs, self.num_slots, cache_lens, fix)

    # -- context checks -------------------------------------------------------------------------

    def check_request(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise `ContextLengthError` before any compute when the request cannot fit: in the
        fixed cache, and always in the model's context window (in local mode the cache grows to
        fit, up to that window)."""
        limits = [n for n in (self.fixed_cache_lens, self.window) if n is not None]
        if not limits:
            return
        limit = min(limits)
        if prompt_tokens >= limit or prompt_tokens + max_new_tokens > limit:
            raise ContextLengthError(
                prompt_tokens=prompt_tokens,
                max_new_tokens=max_new_tokens,
                cache_lens=limit,
                window=limit == self.window,
            )

    def notes(self) -> list[str]:
        """One line per requested setting or speed-up this engine cannot give here, and why
        (printed by the CLI and the server at start-up)."""
        notes = [self.cut_cache_note] if self.cut_cache_note else []
        if self.device.type == "cuda" and self.graph_requested and self.graph_blocked_by:
            notes.append(f"decode runs without CUDA graphs: {self.graph_blocked_by}")
        if self.compile_blocked_by:
            notes.append(f"--compile has no effect here: {self.compile_blocked_by}")
        return notes

    def reserve(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Check the request and, in local mode, size the static cache for it."""
        self.check_request(prompt_tokens, max_new_tokens)
        if self.static and self.fixed_cache_lens is None:
            needed = local_cache_lens(prompt_tokens, max_new_tokens)
            if self.cache is None or self.cache.cache_lens < needed:
                self._allocate(needed)

    # -- primitives -----------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, slot: int, token_ids: list[int], *, reuse: bool = True
    ) -> tuple[torch.Tensor, int]:
        """Make `slot` hold `token_ids`; return the logits after the last one [V] and how many
        leading tokens were reused from the slot's cache (at least one token is recomputed)."""
        slot = self.check_slot(slot)
        if not isinstance(token_ids, list) or not token_ids:
            token_ids = self.check_token_ids(token_ids)  # a tensor, array or tuple; or empty
        self.reserve(len(token_ids), 1)
        cached = self.shared_prefix(slot, token_ids) if reuse else 0
        cached = min(cached, len(token_ids) - 1)
        # only the part computed now: the cached part was checked when it was prefilled (the
        # server prefills a long prompt a chunk at a time, each call with all before it)
        todo = self.check_token_ids(token_ids[cached:])
        self._truncate(slot, cached)
        logits = None
        for start in range(0, len(todo), self.chunk_size):
            logits = self._forward_chunk(
                slot, cached + start, todo[start : start + self.chunk_size]
            )
        return logits, cached

    @torch.inference_mode()
    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """Feed one token per slot at its next position; return logits [B, V]."""
        token_ids = self.check_token_ids(token_ids)
        return self._decode(self.check_step(slots, len(token_ids)), token_ids)

    def _decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """`decode` of checked slots and ids."""
        if not self.static:
            # the context window, which `_decode_static` checks through `reserve`
            self.check_request(max(map(self._length, slots)), 1)
            return torch.cat(
                [
                    self._forward_chunk(s, self._length(s), [t])[None]
                    for s, t in zip(slots, token_ids, strict=True)
                ]
            )
        logits = self._decode_static(slots, token_ids)
        self._record(slots, token_ids)
        return logits

    def decode_sampled(
        self, slots: list[int], sampled: torch.Tensor
    ) -> tuple[torch.Tensor, list[int]]:
        """`decode` of tokens sampled on the device [B], without waiting for them: the step is
        queued first and the ids are read back while it runs. Returns the step's logits [B, V]
        and the ids it fed, as ints.

        This keeps a GPU busy: the host's per-token work (reading the id, detokenizing, stop
        checks, launching the next step) overlaps the device's step instead of alternating with
        it. The price is one step computed for a token that ends a generation; its K/V is as
        valid as any other and stays cached, so the next turn of a conversation reuses it."""
        return self._decode_sampled(self.check_step(slots, len(sampled)), sampled)

    @torch.inference_mode()
    def _decode_sampled(
        self, slots: list[int], sampled: torch.Tensor
    ) -> tuple[torch.Tensor, list[int]]:
        """`decode_sampled` of checked slots (`generate` checked its slot once, not per step)."""
        batch = len(slots)
        readback = self.readback[:batch]
        readback.copy_(sampled, non_blocking=True)  # ordered before the step on the stream
        if self.readback_done is not None:
            self.readback_done.record()
        if not self.static:  # the dynamic path needs the ids on the host first
            if self.readback_done is not None:
                self.readback_done.synchronize()
            token_ids = readback.tolist()
            return self._decode(slots, token_ids), token_ids
        logits = self._decode_static(slots, sampled)
        if self.readback_done is not None:
            self.readback_done.synchronize()  # waits for the sampling only, not for the step
        token_ids = readback.tolist()
        self._record(slots, token_ids)
        return logits, token_ids

    def _decode_static(self, slots: list[int], token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Queue one decode step over the static cache and advance the slots' lengths."""
        positions = [self._length(s) for s in slots]
        self.reserve(max(positions), 1)
        if self.cuda_graph:
            logits = self._graph(len(slots)).run(slots, token_ids, positions)
        elif self.compiled is not None:
            logits = self.compiled.run(slots, token_ids, positions)
        else:
            logits = self._static_forward(slots, token_ids, positions, prefill=False)
        for s in slots:
            self.cache.lengths[s] += 1
        return logits

    def _record(self, slots: list[int], token_ids: list[int]) -> None:
        """Remember which ids the last decode step cached (prefix reuse compares them)."""
        for s, t in zip(slots, token_ids, strict=True):
            self.cache.tokens[s].append(t)

    def check_token_ids(self, token_ids: Any, what: str = "token_ids") -> list[int]:
        """`token_ids` (see `token_list`) as a list of ints, or one sentence. Ids outside the
        embedding would fail inside it: an IndexError on a CPU, on a GPU a device-side assert
        that leaves the CUDA context unusable (a server could not go on)."""
        token_ids = token_list(token_ids, what)
        if not token_ids:
            raise KtinjectError(f"{what} is empty; give at least one token id.")
        vocab = self.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            bad = next(t for t in token_ids if not 0 <= t < vocab)
            raise KtinjectError(
                f"Token id {bad} is outside the model's vocabulary [0, {vocab}); give ids of "
                "this model's tokenizer."
            )
        return token_ids

    def reset(self, slot: int) -> None:
        self._truncate(self.check_slot(slot), 0)

    def warm_up(self) -> None:
        """Compile and capture before the first request, then empty every slot. Triton specialises
        kernels on whether integer arguments are 1 or multiples of 16, so prefills of 2 and 16
        tokens compile every variant a prompt can need; a decode graph is captured per batch size
        (a first request otherwise paid ~0.8 s of compilation on an H200). Where short chunks
        replay decode graphs (`_prefill_rows`), each of those is captured too, and chunks just
        past the largest of them compile the eager prefill's variants."""
        lengths = {2, 16}
        if self.cuda_graph and self.prefill_graphs_allowed:
            top = PREFILL_GRAPH_ROWS[-1]
            lengths |= {*PREFILL_GRAPH_ROWS, top + 2, top + 16}
        try:
            limit = self.fixed_cache_lens or DEFAULT_CHUNK_SIZE
            for length in sorted(n for n in lengths if n < limit):
                self.prefill(0, [0] * length, reuse=False)
            for batch in range(1, self.num_slots + 1):
                self.decode(list(range(batch)), [0] * batch)
        finally:
            for slot in range(self.num_slots):
                self.reset(slot)

    # -- single-sequence generation -------------------------------------------------------------

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        *,
        slot: int = 0,
        reuse: bool = False,
    ) -> Generation:
        """Stream the completion of `prompt_ids` (`params` by default: greedy, 256 new tokens).
        The arguments and the context are checked here, before any compute, so a
        `KtinjectError` (e.g. `ContextLengthError`) is raised by this call, not by iteration."""
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise KtinjectError(
                f"params is {shown(params)}; pass SamplingParams(...), e.g. "
                "SamplingParams(max_new_tokens=64)."
            )
        prompt_ids = self.check_token_ids(prompt_ids, "prompt_ids")
        slot = self.check_slot(slot)
        self.reserve(len(prompt_ids), params.max_new_tokens)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        generation = Generation(pieces=iter(()), stats=stats)
        generation.pieces = self._stream(prompt_ids, params, slot, reuse, generation)
        return generation

    def _stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        slot: int,
        reuse: bool,
        generation: Generation,
    ) -> Iterator[str]:
        stats = generation.stats
        completion = Completion(
            params, tokenizer=self.tokenizer, eos_ids=self.eos_ids, device=self.device
        )
        generation.token_ids = completion.token_ids
        setup_before = self.setup_s
        started = time.perf_counter()
        logits, stats.cached_tokens = self.prefill(slot, prompt_ids, reuse=reuse)
        sampled = completion.sample_on_device(logits)
        sampled[0].item()  # time to first token includes its sampling
        stats.setup_s = self.setup_s - setup_before
        stats.prefill_s = time.perf_counter() - started - stats.setup_s
        decode_started = time.perf_counter()
        mine = self.slot_epochs[slot], self._length(slot)
        while True:
            # Queue the step that feeds `sampled` before looking at it (see decode_sampled),
            # unless the length limit makes it the last token anyway.
            logits = None
            if len(completion.token_ids) + 1 < params.max_new_tokens:
                self._check_still_mine(slot, mine)
                logits, (token,) = self._decode_sampled([slot], sampled)
                mine = mine[0], mine[1] + 1
            else:
                token = int(sampled[0])
            text = completion.accept(token)
            stats.generated_tokens = len(completion.token_ids)
            if text:
                yield text
            if completion.finish_reason is not None or logits is None:
                break
            sampled = completion.sample_on_device(logits[0])
        decode_setup = self.setup_s - setup_before - stats.setup_s
        stats.setup_s += decode_setup
        stats.decode_s = time.perf_counter() - decode_started - decode_setup
        stats.finish_reason = completion.finish_reason

    def _check_still_mine(self, slot: int, mine: tuple[int, int]) -> None:
        """A generation resumed after another call changed its slot (a later `generate`,
        `prefill`, `reset` or `decode` on it) would decode from someone else's cache: refuse.
        `mine` is the slot's epoch and length as this generation left them."""
        if (self.slot_epochs[slot], self._length(slot)) != mine:
            raise KtinjectError(
                f"Slot {slot} was changed by another call (a later generate, prefill, decode or "
                "reset on it) while this generation was streaming; finish a generation before "
                "starting another on its slot, or give each its own (generate(..., slot=N), "
                "Engine(num_slots=...))."
            )

    def shared_prefix(self, slot: int, token_ids: list[int]) -> int:
        """How many leading `token_ids` the slot already holds. The server asks this of every
        free slot per request, on its worker thread (which holds the GIL the HTTP side needs):
        list slices compare in C, so the usual answer (the whole history matches) is one
        comparison, a mismatch a binary search of them; element by element in Python a 4k-token
        history took 0.14 ms per slot here."""
        cached = self.cached_tokens(slot)
        limit = min(len(cached), len(token_ids))
        matched, bound = 0, limit  # the first `matched` agree; the answer is at most `bound`
        while matched < bound:
            middle = (matched + bound + 1) // 2
            if cached[matched:middle] == token_ids[matched:middle]:
                matched = middle
            else:
                bound = middle - 1
        return matched

    # -- internals ------------------------------------------------------------------------------

    def _truncate(self, slot: int, length: int) -> None:
        self.slot_epochs[slot] += 1
        if self.cache is not None:
            self.cache.truncate(slot, length)
            return
        if self.static:
            return
        dynamic = self.dynamic[slot]
        if length == 0 or dynamic is None:
            self.dynamic[slot] = None
            self.dynamic_tokens[slot] = []
        else:
            dynamic.crop(length)
            del self.dynamic_tokens[slot][length:]

    def _forward_chunk(self, slot: int, start: int, chunk: list[int]) -> torch.Tensor:
        """Process `chunk` at positions [start, start+len) of `slot`; return last logits [V]."""
        if self.static:
            rows = self._prefill_rows(start, len(chunk))
            if rows is None:
                logits = self._static_forward([slot], chunk, [start], prefill=True)[0]
            else:
                logits = self._replay_prefill(rows, slot, start, chunk)
            self.cache.lengths[slot] = start + len(chunk)
            self.cache.tokens[slot].extend(chunk)
            return logits
        from transformers import DynamicCache

        if self.dynamic[slot] is None:
            self.dynamic[slot] = DynamicCache(config=self.model.config)
        ids = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            past_key_values=self.dynamic[slot],
            use_cache=True,
            logits_to_keep=1,
        )
        self.dynamic_tokens[slot].extend(chunk)
        return out.logits[0, -1].to(self.device)

    def _prefill_rows(self, start: int, length: int) -> int | None:
        """The decode graph (its row count) that prefills `length` tokens after `start`, or None
        for an eager prefill. On a GPU an eager prefill of a short chunk is host-bound: ~35 ms
        for SmolLM2's 30 layers on an H200 (2026-11-27), whatever the length up to ~128 tokens.
        A decode step treats each row as its own sequence, so the chunk's tokens can be rows of
        one slot at consecutive positions: every row writes its K/V before the attention reads
        (the plain graph writes in a launch of its own) and reads its own prefix, which makes
        the attention causal. Rows past the chunk repeat its last token at its position, so
        they write the same K/V there. Each row re-reads its prefix, hence the byte budget."""
        if not (self.cuda_graph and self.prefill_graphs_allowed) or fused_gemv_pinned():
            return None  # (the fused graph would race: see `_replay_prefill`)
        rows = next((r for r in PREFILL_GRAPH_ROWS if r >= length), None)
        cache = self.cache
        per_position = cache.nbytes // (cache.num_slots * cache.cache_lens)
        if rows is None or rows * (start + length) * per_position > PREFILL_GRAPH_READ_BYTES:
            return None
        return rows

    def _replay_prefill(self, rows: int, slot: int, start: int, chunk: list[int]) -> torch.Tensor:
        """`chunk` at [start, start+len) of `slot` through the decode graph of `rows` rows (see
        `_prefill_rows`); returns the last token's logits [V]."""
        graph = self.prefill_graphs.get(rows)
        if graph is None:
            # plain: the fused graph writes a row's K/V inside the attention launch, where
            # other rows of the same slot may already be reading
            graph = self._capture(lambda: _DecodeGraph(self, rows, fused=False))
            self.prefill_graphs[rows] = graph
        padding = rows - len(chunk)
        last = start + len(chunk) - 1
        positions = [*range(start, last + 1), *[last] * padding]
        logits = graph.run([slot] * rows, [*chunk, *[chunk[-1]] * padding], positions)
        return logits[len(chunk) - 1].clone()  # the graph's buffer is rewritten by the next one

    def _static_forward(
        self,
        slots: list[int],
        token_ids: list[int] | torch.Tensor,
        starts: list[int],
        *,
        prefill: bool,
    ) -> torch.Tensor:
        """Eager forward over the static cache. Prefill: one slot, many tokens. Decode: one token
        per slot. Returns last-position logits [B, V]."""
        device = self.device  # host lists travel by host_ints_to: no wait for queued steps
        if prefill:
            ids = host_ints_to(token_ids, device)[None]
            positions = torch.arange(starts[0], starts[0] + len(token_ids), device=device)[None]
            seq_lens = positions[:, -1] + 1  # int64, as in the captured step
        else:
            ids = decode_ids(token_ids, device)
            positions = host_ints_to(starts, device)[:, None]
            seq_lens = positions[:, 0] + 1
        context = AttentionContext(
            cache=self.cache,
            slots=host_ints_to(slots, device),
            positions=positions,
            seq_lens=seq_lens,
            prefill_start=starts[0] if prefill else None,
            prefill_slot=slots[0],
            max_len=max(starts) + (len(token_ids) if prefill else 1),
            host_rows=None if prefill else list(zip(slots, starts, strict=True)),
        )
        return last_logits(self.model, context, ids, positions)

    def _graph(self, batch: int) -> _DecodeGraph:
        graph = self.graphs.get(batch)
        if graph is None:
            graph = self.graphs[batch] = self._capture(lambda: self._capture_fastest(batch))
        return graph

    def _capture(self, make: Callable[[], _DecodeGraph]) -> _DecodeGraph:
        """`make()` a graph in the engine's memory pool, adding its time to `capture_s`."""
        started = time.perf_counter()
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = make()
        self.capture_s += time.perf_counter() - started
        return graph

    def _capture_fastest(self, batch: int) -> _DecodeGraph:
        """Capture the decode step fused (norms folded into the projections,
        `operators.triton.gemv`; the new token rotated and written inside decode attention) and
        plain, time both replays, keep the faster — the fused one only if its logits agree with
        the plain one's (`same_logits`). Which wins depends on the card and the shapes;
        measuring costs one more capture and a few ms of replays. The choice per batch size is
        kept for later captures (a grown cache) and in `fused_gemv_choice` (shown by `bench`)."""
        options = self.decode_graph_options(batch)
        graphs = {fused: _DecodeGraph(self, batch, fused=fused) for fused in options}
        best = fastest({fused: graph.graph.replay for fused, graph in graphs.items()})
        if len(graphs) > 1 and best and not same_logits(graphs[True].logits, graphs[False].logits):
            # both replayed the same inputs last: a faster graph that disagrees is not kept
            log.warning(
                "decode graph with fused projections disagrees with the plain one at batch %d; "
                "keeping the plain one (KTINJECT_FUSED_GEMV=0 skips the fused one)",
                batch,
            )
            best = False
        self.fused_gemv_choice[batch] = best
        return graphs[best]

    def decode_graph_options(self, batch: int) -> list[bool]:
        """Which decode graphs (fused projections or not) a capture for `batch` rows tries."""
        pinned = fused_gemv_pinned()
        if batch in self.fused_gemv_choice:
            return [self.fused_gemv_choice[batch]]
        if pinned is not None:
            return [pinned]
        if batch > MAX_ROWS or not any(
            isinstance(m, FusedResidualDecoderLayer) for m in self.model.modules()
        ):
            return [False]  # nothing would take the fused path: one capture is enough
        return [False, True]


class DecodeStep:
    """One-token decode for `batch` rows that reads everything from static buffers: token ids,
    positions and slots, and the attention context pointing at them. This is what a CUDA graph
    captures; it runs eagerly too (tests check it makes no host sync).

    Inputs travel as one [3, B] block (slots, ids, positions) in a single host-to-device copy from
    pinned memory; lengths are derived on the device inside the step."""

    def __init__(self, engine: Engine, batch: int) -> None:
        device, cache = engine.device, engine.cache
        self.model = engine.model
        self.inputs = torch.zeros((3, batch), dtype=torch.long, device=device)
        self.staging = torch.zeros((3, batch), dtype=torch.long, pin_memory=device.type == "cuda")
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.slots, self.ids, self.positions = self.inputs[0], self.inputs[1:2].T, self.inputs[2:].T
        # warm-up and capture write K/V at the last position, which no request can have valid
        self.slots.copy_(torch.arange(batch) % cache.num_slots)
        self.positions.fill_(cache.cache_lens - 1)
        self.seq_lens = torch.ones(batch, dtype=torch.long, device=device)
        self.mask = placeholder_mask(self.ids)
        self.context = AttentionContext(
            cache=cache, slots=self.slots, positions=self.positions, seq_lens=self.seq_lens
        )

    def load(
        self, slots: list[int], token_ids: list[int] | torch.Tensor, positions: list[int]
    ) -> None:
        """Stage one step's inputs and copy them to the device in one transfer; ids sampled on
        the device (a tensor) are copied in place there, never through the host."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the staging buffer
        on_device = isinstance(token_ids, torch.Tensor)
        staged = self.staging.numpy()
        staged[0], staged[2] = slots, positions
        if not on_device:
            staged[1] = token_ids
        self.inputs.copy_(self.staging, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if on_device:
            self.inputs[1].copy_(token_ids)

    def __call__(self) -> torch.Tensor:
        torch.add(self.positions[:, 0], 1, out=self.seq_lens)
        return last_logits(self.model, self.context, self.ids, self.positions, self.mask)


class CompiledDecode:
    """Decode through `torch.compile` (inductor), for CPUs: one compiled graph replaces the ~20
    eager ops per layer and lets operators written for it (e.g. `BlockQuantLinear`) fuse into
    single passes over their weights. Compiled once per engine on first use (`warm_up`): one
    graph for batch 1 and one for larger batches, each for any context and cache length (the
    longest row's length is a symbolic size, so attention reads only the valid part of the cache
    without a recompile per token).

    Inductor caches its kernels on disk (`TORCHINDUCTOR_CACHE_DIR`), so later processes compile
    in seconds rather than a minute. `compile_s` adds up the time spent compiling."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.compile_s = 0.0
        self.shapes: set[bool] = set()
        self.marked: StaticKVCache | None = None
        self.function = own_copy(decode_forward)  # engines for other models compile apart
        # Inductor inlines cheap elementwise producers into their consumers; inlined into a
        # GEMV, a norm's output is recomputed once per output row (measured 2x slower on the
        # SmolLM2 projections). Realizing values read more than once keeps them computed once.
        # Dynamo guards every module attribute and parameter it read (~270 tensors for SmolLM2):
        # 2.7 ms of each call on a 2-core AVX2 EPYC, 0.6 ms without the module guards (decode
        # 4-10% faster, same process). Skipping them is safe here: the engine owns the model,
        # and nothing changes its modules after the engine is built (the operators are in
        # place, linears already `DecodeLinear`); the cache and step inputs stay guarded. For
        # the same reason the compiled step skips checking the size and strides of each of its
        # ~400 inputs (mostly weights) on every call: 19-21 -> 16-19 ms a SmolLM2 `llama-cpu-q4`
        # step on that EPYC (processes alternating, three each).
        self.forward = torch.compile(
            self.function,
            fullgraph=True,
            options={
                "realize_reads_threshold": 1,
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                "size_asserts": False,
            },
        )

    def run(
        self, slots: list[int], token_ids: list[int] | torch.Tensor, positions: list[int]
    ) -> torch.Tensor:
        device, cache = self.engine.device, self.engine.cache
        if cache is not self.marked:  # local mode grows the cache: one graph for every size
            for buffer in (t for pair in cache.kv.values() for t in pair):
                torch._dynamo.mark_dynamic(buffer, 2)
            self.marked = cache
        ids = decode_ids(token_ids, device)
        if not ids.is_inference():
            # ids sampled outside inference mode (generation) carry a dispatch key that host ids
            # (warm_up) lack; dynamo guards on it and would compile the step a second time
            ids = ids.clone()
        at = torch.tensor(positions, device=device)[:, None]
        rows = torch.tensor(slots, device=device)
        window = torch.empty(max(positions) + 1, dtype=torch.uint8)  # its length is the bound
        torch._dynamo.mark_dynamic(window, 0)
        for tensor in (ids, at, rows):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        inputs = (self.engine.model, cache, rows, ids, at, window)
        key = len(slots) == 1  # batch 1 is a graph of its own; other sizes share one
        if key in self.shapes:
            return self.forward(*inputs)
        started = time.perf_counter()
        try:  # the first call of a kind compiles
            logits = self.forward(*inputs)
        except Exception as exc:  # noqa: BLE001 - inductor raises many kinds; all mean the same
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise KtinjectError(
                f"torch.compile could not compile the decode step ({type(exc).__name__}: "
                f"{first}); run without --compile."
            ) from exc
        self.shapes.add(key)
        self.compile_s += time.perf_counter() - started
        return logits


def decode_forward(
    model: nn.Module,
    cache: StaticKVCache,
    slots: torch.Tensor,
    ids: torch.Tensor,
    positions: torch.Tensor,
    window: torch.Tensor,
) -> torch.Tensor:
    """One decode step for rows `slots` (token `ids` at `positions`), attending over at most
    `window.shape[0]` cache positions; returns logits [B, V]. Written for `torch.compile`."""
    context = AttentionContext(
        cache=cache,
        slots=slots,
        positions=positions,
        seq_lens=positions[:, 0] + 1,
        max_len=window.shape[0],
    )
    return last_logits(model, context, ids, positions, placeholder_mask(ids))


def last_logits(
    model: nn.Module,
    context: AttentionContext,
    ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's forward over `ids` at `positions` with `context` visible to the attention
    operators; returns the last position's logits [B, V] (the only ones computed), on the ids'
    device (a rule may have placed the head elsewhere)."""
    with use_context(context):
        out = model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=False,
            logits_to_keep=1,
        )
    return out.logits[:, -1].to(ids.device)


class _DecodeGraph:
    """A `DecodeStep` captured in a CUDA graph; `run` loads the inputs and replays it. `fused`:
    captured with the fused path of the decoder layers and attention (`operators.layer`,
    `operators.attention`)."""

    def __init__(self, engine: Engine, batch: int, *, fused: bool) -> None:
        self.step = DecodeStep(engine, batch)
        with prefer_fused_gemv(fused):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=engine.graph_pool):
                self.logits = self.step()

    def run(
        self, slots: list[int], token_ids: list[int] | torch.Tensor, positions: list[int]
    ) -> torch.Tensor:
        self.step.load(slots, token_ids, positions)
        self.graph.replay()
        return self.logits


def same_logits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two decode paths' logits [B, V] agree within the project's tolerance relative to
    the logit scale: 2e-2 in 16-bit dtypes, 1e-3 in fp32 (where only the accumulation order
    differs). Non-finite values never agree."""
    tolerance = 1e-3 if a.dtype == b.dtype == torch.float32 else 2e-2
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    scale = b.abs().max().clamp_min(1e-6)
    return bool((a - b).abs().max() <= tolerance * scale)


def fastest(candidates: dict[Any, Callable[[], Any]], *, rounds: int = 3, calls: int = 8) -> Any:
    """The key of the candidate whose calls take least device time: rounds alternate between
    candidates (so drift hits all alike) and each candidate keeps its best round. A single
    candidate is returned untimed."""
    if len(candidates) == 1:
        return next(iter(candidates))
    best: dict[Any, float] = {}
    for _ in range(rounds):
        for key, call in candidates.items():
            call()  # warm
            seconds = _device_seconds(call, calls)
            best[key] = min(best.get(key, seconds), seconds)
    return min(best, key=best.get)


def _device_seconds(call: Callable[[], Any], calls: int) -> float:
    if not torch.cuda.is_available():
        started = time.perf_counter()
        for _ in range(calls):
            call()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def graph_blocker(model: nn.Module) -> str | None:
    """Why decode of `model` cannot be captured in a CUDA graph or compiled as one graph, or None:
    an operator that says so (`Operator.not_capturable`), or Hugging Face's experts modules: the
    eager loop reads the routing on the host, and grouped_mm builds its group offsets from a CPU
    tensor (measured on an H200, 2026-11-27)."""
    for module in model.modules():
        if getattr(module, "not_capturable", None):
            return module.not_capturable
    if any(
        type(m).__name__.endswith("Experts") and type(m).__module__.startswith("transformers.")
        for m in model.modules()
    ):
        return "its MoE experts are Hugging Face's, which read the routing on the host"
    devices = model_devices(model)
    if len(devices) > 1:
        listed = ", ".join(sorted(map(str, devices)))
        return f"the rules place its modules on {listed}, and a graph captures one device's work"
    return None


def check_engine_arguments(model: Any, tokenizer: Any, **switches: Any) -> None:
    """What `Engine` needs before it touches the model, in one sentence each: a module with an
    input embedding and real weights (on meta, its first read fails deep inside), a tokenizer or
    None (a number there meant `cache_lens`), and True/False switches ("no" would be true)."""
    if not isinstance(model, nn.Module) or not callable(
        getattr(model, "get_input_embeddings", None)
    ):
        raise KtinjectError(
            f"model is {shown(model)}; Engine takes a loaded causal LM, e.g. "
            "ktinject.loading.load(...).model or a transformers AutoModelForCausalLM."
        )
    if is_meta(model):
        raise KtinjectError(
            "The model's weights are still on the meta device (shapes only, as "
            "ktinject.loading.plan or a rule with device 'meta' leaves them); load them first, "
            "e.g. with ktinject.loading.load(...)."
        )
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise KtinjectError(
            f"tokenizer is {shown(tokenizer)}; give the model's tokenizer or None, and the "
            "other settings by keyword (e.g. cache_lens=64)."
        )
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise KtinjectError(f"{name} is {value!r}; it must be True or False.")


def shown(value: Any) -> str:
    """`value` for a one-line message: its repr when short and on one line, and its type."""
    text = repr(value)
    if "\n" in text or len(text) > 60:
        return f"a {type(value).__name__}"
    return f"{text} ({type(value).__name__})"


def token_list(token_ids: Any, what: str) -> list[int]:
    """Token ids as a list of ints: from a list or tuple of ints (numpy integers too), or from an
    integer tensor / array of one sequence, [T] or [1, T] (what `tokenizer(text,
    return_tensors="pt").input_ids` gives). Anything else is one sentence: floats would be
    truncated, text and nested lists fail inside the model."""
    if isinstance(token_ids, np.ndarray) and np.issubdtype(token_ids.dtype, np.integer):
        token_ids = torch.from_numpy(token_ids)
    if isinstance(token_ids, torch.Tensor):
        integral = not (token_ids.is_floating_point() or token_ids.is_complex())
        one_row = token_ids.dim() <= 1 or (token_ids.dim() == 2 and token_ids.shape[0] == 1)
        if integral and token_ids.dtype != torch.bool and one_row:
            return token_ids.reshape(-1).tolist()
        raise KtinjectError(
            f"{what} is a {token_ids.dtype} tensor of shape {list(token_ids.shape)}; it must "
            "hold the integer token ids of one sequence, shape [T] or [1, T]."
        )
    if isinstance(token_ids, list | tuple):
        kinds = set(map(type, token_ids))  # in C: a long prompt costs ~20 ns per id
        if kinds <= {int}:
            return list(token_ids)
        if all(issubclass(kind, np.integer) or kind is int for kind in kinds):
            return [int(t) for t in token_ids]
    raise KtinjectError(
        f"{what} is {shown(token_ids)}; it must be a list of token ids (ints); tokenize text "
        "first, e.g. tokenizer(text)['input_ids']."
    )


def decode_ids(token_ids: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """One decode step's input ids as [B, 1]: built from host ints, or a view of ids already
    sampled on the device."""
    if not isinstance(token_ids, torch.Tensor):
        token_ids = host_ints_to(token_ids, device)
    return token_ids.to(device).reshape(-1, 1)


def placeholder_mask(ids: torch.Tensor) -> torch.Tensor:
    """A 4-D mask makes Hugging Face return it as-is instead of building its own: that build scans
    position ids with a host sync (fatal inside CUDA-graph capture) and sizes masks by the whole
    context. Our attention operators take positions and lengths from the context instead."""
    return torch.ones((ids.shape[0], 1, ids.shape[1], 1), dtype=torch.bool, device=ids.device)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer (chat models often end
    turns with a token that only one of them names, e.g. <|im_end|>)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for source in (generation_config, getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
