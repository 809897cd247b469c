"""Fixed-size KV caches and the context that tells attention operators where to read and write.

`StaticKVCache` holds, per attention layer, K and V buffers of shape
[slots, kv_heads, cache_lens, head_dim], allocated once on that layer's device so decode can be
captured in a CUDA graph with fixed addresses. A *slot* is one sequence (one conversation in the
server); its host-side `lengths` and `tokens` say which positions are valid and which token ids they
hold, so a later request can reuse a shared prefix.

Attention operators find their buffers and the current positions through `current_context()`,
set by the engine around each forward (the model's own call signature never changes). Outside a
context they fall back to Hugging Face's own cache, so `optimize()`d models still work with
`model.generate()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ktinject.errors import KtinjectError

PAGE = 256


def local_cache_lens(prompt_tokens: int, max_new_tokens: int, page: int = PAGE) -> int:
    """Cache size for one local call: prompt + new tokens, rounded up to a page so that calls of
    similar size share one allocation and one captured graph."""
    needed = prompt_tokens + max_new_tokens
    return max(page, -(-needed // page) * page)


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one layer's cache; `value_dim` differs from `head_dim` only for MLA-like layers."""

    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_position(self) -> int:
        return self.kv_heads * (self.head_dim + self.value_dim) * self.dtype.itemsize


def check_cache_memory(
    specs: dict[int, LayerSpec], num_slots: int, cache_lens: int, fix: str
) -> None:
    """Refuse, in one sentence ending with `fix`, a cache larger than the memory free on one of
    its devices: the allocator's own error is a traceback with a byte count, and far too many
    slots first spent minutes building their host-side bookkeeping."""
    needed: dict[torch.device, int] = {}
    for spec in specs.values():
        device = torch.device(spec.device)
        needed[device] = needed.get(device, 0) + spec.bytes_per_position * num_slots * cache_lens
    for device, nbytes in needed.items():
        free = available_memory(device)
        if free is not None and nbytes > free:
            slots = f"{num_slots:,} slots x " if num_slots > 1 else ""
            raise KtinjectError(
                f"A KV cache of {slots}{cache_lens:,} positions needs {nbytes / 2**30:,.1f} GiB "
                f"on {device}, but {free / 2**30:,.1f} GiB is free there; {fix}."
            )


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`; None where that is not known."""
    if device.type == "cuda":  # what the driver has left, and what torch holds unused
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


class StaticKVCache:
    """K/V buffers for `num_slots` sequences of up to `cache_lens` positions each. A decode step
    may have more rows than slots (`max_rows`): rows of one slot at consecutive positions are how
    the engine replays a short prefill chunk."""

    def __init__(
        self,
        specs: dict[int, LayerSpec],
        *,
        num_slots: int,
        cache_lens: int,
        max_rows: int | None = None,
    ) -> None:
        self.specs = specs
        self.num_slots = num_slots
        self.cache_lens = cache_lens
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, spec in specs.items():
            shape = (num_slots, spec.kv_heads, cache_lens)
            self.kv[layer] = (
                torch.zeros((*shape, spec.head_dim), dtype=spec.dtype, device=spec.device),
                torch.zeros((*shape, spec.value_dim), dtype=spec.dtype, device=spec.device),
            )
        self.lengths = [0] * num_slots
        self.tokens: list[list[int]] = [[] for _ in range(num_slots)]
        # per device and row, zero between kernels: lets decode attention merge its splits
        # without a second launch (operators.triton.decode_attention, `counters`)
        heads = max((spec.kv_heads for spec in specs.values()), default=0)
        rows = max(num_slots, max_rows or 0)
        self.split_counters = {
            device: torch.zeros((rows, heads), dtype=torch.int32, device=device)
            for device in {k.device for k, _ in self.kv.values()}  # as the kernels see it
        }
        # tensors operators derive from the cache's size (e.g. `operators.rope.RotaryTable`'s
        # cos/sin per position): made once, and alive as long as the graphs that read them
        self.derived: dict[object, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())

    def copy_from(self, other: StaticKVCache) -> None:
        """Take over the contents of a smaller cache (local mode grows without losing state)."""
        for layer, (k, v) in other.kv.items():
            length = min(other.cache_lens, self.cache_lens)
            self.kv[layer][0][:, :, :length] = k[:, :, :length]
            self.kv[layer][1][:, :, :length] = v[:, :, :length]
        self.lengths = list(other.lengths)
        self.tokens = [list(tokens) for tokens in other.tokens]

    def reset(self, slot: int) -> None:
        """Forget a slot's contents (stale data past `lengths` is never read)."""
        self.truncate(slot, 0)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` positions of `slot` (history reuse keeps a shared prefix)."""
        length = max(0, min(length, self.lengths[slot]))
        self.lengths[slot] = length
        del self.tokens[slot][length:]


@dataclass
class AttentionContext:
    """Where the tokens of the current forward go.

    Rows are sequences, `positions` [B, T] the cache positions of the new tokens (also their RoPE
    positions), `seq_lens` [B] each row's valid length once they are written. For a
    single-sequence prefill chunk `prefill_start` and `prefill_slot` repeat the first position and
    the slot as host ints (so operators slice without a device sync). In eager decode
    `host_rows` repeats each row's (slot, position) on the host and `max_len` bounds `seq_lens`;
    both are None inside a CUDA graph, where only the device tensors may be read.
    """

    cache: StaticKVCache
    slots: torch.Tensor
    positions: torch.Tensor
    seq_lens: torch.Tensor
    prefill_start: int | None = None
    prefill_slot: int = 0
    max_len: int | None = None
    host_rows: list[tuple[int, int]] | None = None
    copies: dict[torch.device, AttentionContext] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> AttentionContext:
        """This context with its tensors on `device`, for layers a rule placed on another device
        than the embedding's (copied once per forward and device; itself where they are)."""
        if self.positions.device == device:
            return self
        if device not in self.copies:
            self.copies[device] = dataclasses.replace(
                self,
                slots=self.slots.to(device),
                positions=self.positions.to(device),
                seq_lens=self.seq_lens.to(device),
                copies={},
            )
        return self.copies[device]


_LOCAL = threading.local()  # one stack per thread: two engines on two threads never mix


def _stack() -> list[AttentionContext]:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def current_context(device: torch.device | None = None) -> AttentionContext | None:
    """The context of the forward in progress (None outside the engine), with its tensors on
    `device` when one is given."""
    stack = _stack()
    if not stack:
        return None
    return stack[-1] if device is None else stack[-1].on(device)


@contextlib.contextmanager
def use_context(context: AttentionContext) -> Iterator[AttentionContext]:
    """Make `context` visible to attention operators for the duration of one forward."""
    stack = _stack()
    stack.append(context)
    try:
        yield context
    finally:
        stack.pop()
