"""MoE experts that decode without reading the routing on the host.

Hugging Face's fused experts modules (`MixtralExperts`, `Qwen3MoeExperts`, `OlmoeExperts`,
`DeepseekV3Experts`: weights `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]) loop over the
experts that received tokens, which needs the routing on the host: a CUDA graph cannot capture
that, nor can torch.compile trace it as one graph, so MoE models decoded eagerly.

`GatheredExperts` computes a few tokens (decode) on a GPU or inside torch.compile by indexing the
weights of each token's top-k experts on the device: the shapes depend on nothing but the batch,
and no value crosses to the host. In the decode graph with fused projections (see
`operators.layer`) a GPU reads the selected experts' weights in place
(`operators.triton.experts`); otherwise torch copies them first. Elsewhere (many tokens outside
a capture, or eager on a CPU, where a host read costs nothing) it takes a grouped per-expert
loop that reads the weights in place: the gathered copies of k expert matrices per token cost a
CPU 6-7x HF's decode time (measured below).

`CPUExperts` keeps the experts in CPU memory and computes them there (KTransformers' placement
for MoE models whose experts outgrow the GPU: Qwen3-30B-A3B's experts are 29 of its 30B
parameters). Attention, router and everything else stay on the GPU; the few hidden states each
layer routes cross to the CPU and back. Reading the routing on the host rules out a captured
decode step, so the engine decodes such a model eagerly (`not_capturable`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from operators import native
from operators.base import Operator, check_source, take
from operators.linear import (
    BLOCK,
    FORMATS,
    BlockFormat,
    Blocks,
    block_gemv,
    block_linear,
    kernel,
    native_available,
    quantize_blocks,
)
from operators.triton.experts import gathered_experts, gathered_experts_reference
from operators.triton.fused import use_triton
from operators.triton.gemv import fused_gemv_preferred

GATHER_ROWS = 8  # at most this many tokens take the gathered (graph-safe) path
PROJECTIONS = ("gate_up_proj", "down_proj")
SILU = ("SiLU", "SiLUActivation")  # torch's and transformers' SiLU modules: F.silu
BLOCK_PARTS = ("packed", "scales", "mins")  # buffers of one matrix in a block format


def taken_experts(
    operator: type, module: nn.Module, device: torch.device | None, kwargs: dict[str, Any]
) -> tuple[nn.Parameter, nn.Parameter, nn.Module]:
    """(gate_up_proj, down_proj, act_fn) of an HF fused experts module, weights taken onto
    `device`, after `check_source`'s checks and a check of the 3-D layouts."""
    check_source(operator, module, kwargs, ("gate_up_proj", "down_proj", "act_fn"))
    gate_up, down = module.gate_up_proj, module.down_proj
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] != 2 * down.shape[2]:
        raise TypeError(
            f"{type(module).__name__} does not hold gate_up_proj [E, 2I, H] and "
            f"down_proj [E, H, I] (got {tuple(gate_up.shape)} and {tuple(down.shape)})"
        )
    return take(gate_up, device), take(down, device), module.act_fn


def select_blocks(
    blocks: tuple[torch.Tensor | None, ...], index: int | torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """(packed, scales, mins) of the experts at `index` (mins may be None: Q8_0)."""
    return tuple(None if t is None else t[index] for t in blocks)


def graph_safe(tensor: torch.Tensor) -> bool:
    """Whether a call should not read device values on the host: off the CPU (the decode step
    may be captured in a CUDA graph, and a read stalls the GPU) and inside torch.compile (one
    graph). A CPU eager call may."""
    return tensor.device.type != "cpu" or torch.compiler.is_compiling()


def host_reads_forbidden(tensor: torch.Tensor) -> bool:
    """Whether a host read would fail here: inside torch.compile's graph or a CUDA-graph capture
    (the server captures decode steps of more rows than `GATHER_ROWS`)."""
    capturing = tensor.is_cuda and torch.cuda.is_current_stream_capturing()
    return capturing or torch.compiler.is_compiling()


class GatheredExperts(Operator):
    """Drop-in for Hugging Face's fused 3-D experts modules; same forward signature
    `(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`."""

    memory_grows_with_rows = True  # inside a capture each row gathers its k experts' weights

    def __init__(
        self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn: nn.Module
    ) -> None:
        super().__init__()
        self.num_experts = gate_up_proj.shape[0]
        self.hidden_dim = gate_up_proj.shape[2]
        self.intermediate_dim = down_proj.shape[2]
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        name: str,
        config: Any,
        device: torch.device | None,
        **kwargs: Any,
    ) -> Self:
        return cls(*taken_experts(cls, module, device, kwargs))

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        few = hidden_states.shape[0] <= GATHER_ROWS
        if graph_safe(hidden_states) and (few or host_reads_forbidden(hidden_states)):
            return self._gathered(hidden_states, top_k_index, top_k_weights)
        if few:
            return self._token_by_token(hidden_states, top_k_index, top_k_weights)
        return self._grouped(hidden_states, top_k_index, top_k_weights)

    def _gathered(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Graph-safe: in place in the fused decode step on a GPU (the engine keeps that step
        only if it agrees with the plain one), else through torch's gathered copies."""
        experts = (self.gate_up_proj, self.down_proj)
        silu_in_dtype = type(self.act_fn).__name__ in SILU and experts[0].dtype == hidden.dtype
        if silu_in_dtype and fused_gemv_preferred() and use_triton(hidden):
            return gathered_experts(hidden, index, weights, *experts)
        return gathered_experts_reference(hidden, index, weights, *experts, self.act_fn)

    def _token_by_token(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """A CPU decode step: each token through the gathered products compiled on their own
        (inductor reads the k experts' weights in place, no copies: 1.7 vs 3.0 ms for HF's loop
        per token on a Qwen3-30B-A3B layer here), one compiled kernel for every layer and batch
        size; SiLU experts only (the activation is not an argument: a module would be guarded
        by identity)."""
        if type(self.act_fn).__name__ not in SILU:
            return self._grouped(hidden, index, weights)
        compiled, experts = self._decode_kernel(hidden.dtype, index.shape[1])
        rows = [
            compiled(hidden[t : t + 1], index[t : t + 1], weights[t : t + 1], *experts)
            for t in range(hidden.shape[0])
        ]
        return torch.cat(rows)

    def _decode_kernel(
        self, dtype: torch.dtype, top_k: int
    ) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]]:
        """The compiled one-token function and the expert operands it takes after the token."""
        shape = (*self.gate_up_proj.shape, *self.down_proj.shape, dtype, top_k)
        return kernel(gathered_experts_reference, shape), (self.gate_up_proj, self.down_proj)

    def _grouped(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Tokens sorted by expert, one pair of matmuls per expert that received any."""
        k = index.shape[1]
        flat = index.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // k
        scale = weights.flatten()[order, None]
        out = torch.zeros_like(hidden)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = tokens[start : start + count]
                result = self._expert_mlp(expert, hidden[rows])
                out.index_add_(0, rows, (result * scale[start : start + count]).to(out.dtype))
            start += count
        return out

    def _expert_mlp(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's gated MLP on the tokens routed to it, x [n, H] -> [n, H]."""
        gate, up = (x @ self.gate_up_proj[expert].T).chunk(2, dim=-1)
        return (self.act_fn(gate) * up) @ self.down_proj[expert].T

    def extra_repr(self) -> str:
        experts, hidden = self.num_experts, self.hidden_dim
        return f"experts={experts}, hidden={hidden}, intermediate={self.intermediate_dim}"


class CPUExperts(GatheredExperts):
    """HF's fused experts kept and computed on the CPU, whatever device the layer's hidden states
    come from; the result goes back to that device. On the CPU the routing may be read on the
    host: decode tokens take the compiled gathered products (`_token_by_token`), more tokens the
    grouped loop (one pair of matmuls per expert that received tokens, weights read in place).

    `threads` (rule kwarg): torch intra-op threads for the experts' matmuls, set around each
    call and restored after (default: torch's, one per physical core).

    `format` (rule kwarg, `q4_1` or `q8_0`; default none: the checkpoint's dtype): keep each
    expert's matrices in that GGUF block format (`operators.linear`), 3.2x (Q4_1) / 1.9x (Q8_0)
    fewer bytes than bf16, decode tokens' experts read in place by the C kernel of
    `operators.native` (without a C compiler: one compiled call per token). Lossless for
    weights that came from a GGUF file of that format, llama.cpp's quantization otherwise.
    Hidden and intermediate sizes must be multiples of 32."""

    not_capturable = (
        "its MoE experts run on the CPU (operators.experts.CPUExperts), which reads the "
        "routing on the host"
    )
    places_inputs = True  # three copies queued, one stream sync (see forward)

    def __init__(
        self,
        gate_up_proj: nn.Parameter,
        down_proj: nn.Parameter,
        act_fn: nn.Module,
        threads: int | None = None,
        fmt: BlockFormat | None = None,
    ) -> None:
        super().__init__(gate_up_proj, down_proj, act_fn)
        self.threads = threads
        self.fmt = fmt
        if fmt is not None:
            for name in PROJECTIONS:
                self._store_blocks(name, self._parameters.pop(name))
            self.register_load_state_dict_pre_hook(self._quantize_on_load)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        name: str,
        config: Any,
        device: torch.device | None,
        threads: int | None = None,
        format: str | None = None,  # noqa: A002 - the rule file's key
        **kwargs: Any,
    ) -> Self:
        if device is None or torch.device(device).type != "cpu":
            raise TypeError(
                f"CPUExperts keeps the experts in CPU memory, but the rule places them on "
                f"{device}; set the rule's replace.device to cpu"
            )
        if threads is not None and (type(threads) is not int or threads < 1):
            raise TypeError(f"threads must be a positive integer or null, not {threads!r}")
        fmt = None if format is None else FORMATS.get(str(format).lower())
        if format is not None and fmt is None:
            raise TypeError(f"format {format!r} is not one of {sorted(FORMATS)} or null")
        gate_up, down, act_fn = taken_experts(cls, module, device, kwargs)
        hidden, intermediate = gate_up.shape[2], down.shape[2]
        if fmt is not None and (hidden % BLOCK or intermediate % BLOCK):
            raise TypeError(
                f"format {fmt.name} needs hidden and intermediate sizes that are multiples of "
                f"{BLOCK}, got {hidden} and {intermediate}; use format: null"
            )
        if fmt is not None:
            native.build_for(device)
        return cls(gate_up, down, act_fn, threads, fmt)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        home = hidden_states.device
        inputs = [
            t.to("cpu", non_blocking=True) for t in (hidden_states, top_k_index, top_k_weights)
        ]
        if home.type == "cuda":  # the three copies were queued; wait for them once
            torch.cuda.current_stream(home).synchronize()
        with intra_op_threads(self.threads):
            few = inputs[0].shape[0] <= GATHER_ROWS
            out = (self._token_by_token if few else self._grouped)(*inputs)
        return out.to(home, non_blocking=True)

    def _store_blocks(self, name: str, weight: torch.Tensor) -> None:
        """`weight` [E, N, K] as `<name>_packed` / `_scales` / `_mins` buffers (on meta, only
        their shapes: the checkpoint's weight is quantized as it loads)."""
        experts, rows, cols = weight.shape
        if weight.is_meta:
            blocks = (experts, rows, cols // BLOCK)
            packed = torch.empty(
                (*blocks, self.fmt.packed_width), dtype=self.fmt.packed_dtype, device="meta"
            )
            scales = torch.empty(blocks, dtype=torch.float16, device="meta")
            parts = (packed, scales, scales.clone() if self.fmt.has_min else None)
        else:
            parts = self._quantized(weight)
        for part, tensor in zip(BLOCK_PARTS, parts, strict=True):
            self.register_buffer(f"{name}_{part}", tensor)

    def _quantized(self, weight: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        experts, rows, cols = weight.shape
        parts = quantize_blocks(weight.reshape(experts * rows, cols), self.fmt)
        return tuple(None if p is None else p.reshape(experts, rows, *p.shape[1:]) for p in parts)

    def _quantize_on_load(self, _: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for name in PROJECTIONS:
            weight = state_dict.pop(f"{prefix}{name}", None)
            if weight is None:
                continue
            parts = self._quantized(weight)
            native.build_for(weight.device)
            for part, tensor in zip(BLOCK_PARTS, parts, strict=True):
                if tensor is not None:
                    state_dict[f"{prefix}{name}_{part}"] = tensor

    def _expert_mlp(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        if self.fmt is None:
            return super()._expert_mlp(expert, x)
        gate_up, down = (select_blocks(self._blocks(name), expert) for name in PROJECTIONS)
        gate, up = block_linear(x, gate_up, self.fmt, x.dtype).chunk(2, dim=-1)
        return block_linear(self.act_fn(gate) * up, down, self.fmt, x.dtype)

    def _token_by_token(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Block formats with the C kernel built: every token's experts in two calls that read
        the packed bytes in place (`native_block_experts`); else the compiled kernel per token."""
        silu = type(self.act_fn).__name__ in SILU
        if self.fmt is None or not silu or not native_available():
            return super()._token_by_token(hidden, index, weights)
        gate_up, down = (self._blocks(name) for name in PROJECTIONS)
        return native_block_experts(hidden, index, weights, gate_up, down)

    def _decode_kernel(
        self, dtype: torch.dtype, top_k: int
    ) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]]:
        if self.fmt is None:
            return super()._decode_kernel(dtype, top_k)
        gate_up, down = (self._blocks(name) for name in PROJECTIONS)
        shape = (*gate_up[0].shape, *down[0].shape, self.fmt.name, dtype, top_k)
        return kernel(gathered_block_experts, shape), (gate_up, down, self.fmt)

    def _blocks(self, name: str) -> tuple[torch.Tensor | None, ...]:
        """(packed, scales, mins) of the `name` matrices of all experts."""
        return tuple(getattr(self, f"{name}_{part}") for part in BLOCK_PARTS)

    def extra_repr(self) -> str:
        threads = f", threads={self.threads}" if self.threads is not None else ""
        fmt = f", format={self.fmt.name}" if self.fmt is not None else ""
        return super().extra_repr() + threads + fmt


def gathered_block_experts(
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    gate_up: Blocks,
    down: Blocks,
    fmt: BlockFormat,
) -> torch.Tensor:
    """One token [1, H] through its k SiLU experts held as blocks ([E, N, K/32, w] each),
    `gathered_experts_reference` for block formats: compiled, the blocks of the k experts are
    read in place, all in one call."""
    gate_up, down = select_blocks(gate_up, index[0]), select_blocks(down, index[0])
    gate, up = block_gemv(hidden.float(), *gate_up, fmt).to(hidden.dtype).chunk(2, dim=-1)
    inner = F.silu(gate) * up  # [k, I]
    out = block_gemv(inner.float(), *down, fmt).to(hidden.dtype)  # [k, H]
    return (out * weights[0][:, None]).sum(0, keepdim=True).to(hidden.dtype)


def native_block_experts(
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    gate_up: Blocks,
    down: Blocks,
) -> torch.Tensor:
    """`gathered_block_experts` for T tokens [T, H] at once through the C kernel
    (`operators.native.block_matmul_experts`): row t*k+i is token t through its i-th expert,
    rounded to the hidden dtype where that function rounds. Decode of Qwen3-30B-A3B's experts
    per token and layer: see benchmarks/RESULTS.md."""
    tokens, k = index.shape
    experts = index.flatten()
    rows = hidden.repeat_interleave(k, dim=0)  # [T*k, H]
    products = native.block_matmul_experts(rows, experts, *gate_up).to(hidden.dtype)
    gate, up = products.chunk(2, dim=-1)
    out = native.block_matmul_experts(F.silu(gate) * up, experts, *down).to(hidden.dtype)
    return (out.view(tokens, k, -1) * weights[:, :, None]).sum(1).to(hidden.dtype)


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch intra-op threads (None: as they are)."""
    saved = torch.get_num_threads()
    if threads is None or threads == saved:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
