"""Linear layers whose weights stay in GGUF block formats (Q4_1, Q8_0), computed in float.

A Q4_1 GGUF dequantized to fp32 (what transformers' GGUF loader hands us) is 6.4x larger than the
file, and CPU decode is bound by streaming those bytes: SmolLM2-135M reads ~540 MB of fp32 weights
per token. `BlockQuantLinear` keeps each row as blocks of 32 weights (4- or 8-bit integers plus a
float16 scale, and a float16 minimum for Q4_1), laid out byte for byte as in a GGUF file.

Quantizing a weight that came from such a block format gives back the very same blocks, so the
dequantized values equal the fp32 weights bit for bit (tests/test_linear.py proves it with gguf's
own quantizer); only the order of the float sums differs from a matmul. Any other weight is
quantized the way llama.cpp does it (lossy).

Decode wants one pass over the packed bytes. On a CPU the C kernel of `operators.native` takes
every row count: a decode batch unpacks each block once for all its rows, a prefill unpacks the
weight panel by panel into the cache and multiplies there (outside fp32, only decode batches up
to NATIVE_ROWS rows); a compiled decode step (`--compile`) calls it as the torch op
`ktinject::block_matmul`. Elsewhere, or where no C compiler builds it, up to GEMV_ROWS rows take
`block_gemv`, an expression inductor turns into one vectorized loop that unpacks, scales and
accumulates in registers (inside a compiled decode step it fuses with its neighbours; called
eagerly it is compiled on its own per weight shape). More rows dequantize the weight (also a
compiled kernel) and multiply with `F.linear`.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from ktinject.compiling import own_copy
from operators import native
from operators.base import Operator
from operators.native import ops as native_ops

log = logging.getLogger(__name__)

BLOCK = 32
GEMV_ROWS = 8  # at most this many rows (a decode batch) take the fused GEMV in a compiled graph
# in fp32 every row count takes the C kernel on a CPU; in other dtypes at most this many rows
# (decode batches), since a bf16 matmul of the dequantized weight may beat its fp32 panels
NATIVE_ROWS = 48

Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (packed, scales, mins or None)


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF block format: integer type of the packed blocks and whether blocks have a min."""

    name: str
    bits: int
    has_min: bool

    @property
    def packed_width(self) -> int:
        """Bytes per block of 32 weights, scales excluded."""
        return BLOCK * self.bits // 8

    @property
    def packed_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bits == 4 else torch.int8


FORMATS = {
    "q4_1": BlockFormat("q4_1", bits=4, has_min=True),
    "q8_0": BlockFormat("q8_0", bits=8, has_min=False),
}


def quantize_blocks(weight: torch.Tensor, fmt: BlockFormat) -> Blocks:
    """Split `weight` [N, K] into blocks of 32 along K; return (packed, scales, mins).

    Q4_1: min m = block min, scale d = (max - min) / 15, both rounded to float16, q in 0..15,
    value d*q + m; byte j of a block holds q[j] in its low and q[j+16] in its high nibble.
    Q8_0: d = max|w| / 127 in float16, q in -127..127, value d*q.
    Scales and minima are rounded to float16 *before* the integers are chosen, so blocks that
    were made this way are recovered exactly.
    """
    out_features, in_features = weight.shape
    blocks = weight.detach().float().reshape(out_features, in_features // BLOCK, BLOCK)
    if fmt.has_min:
        low, high = blocks.amin(-1), blocks.amax(-1)
        scales, mins = ((high - low) / 15).half(), low.half()
        d, m = scales.float()[..., None], mins.float()[..., None]
        q = torch.where(d > 0, ((blocks - m) / d).round(), 0).clamp(0, 15).to(torch.uint8)
        packed = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
        return packed.contiguous(), scales, mins
    scales = (blocks.abs().amax(-1) / 127).half()
    d = scales.float()[..., None]
    q = torch.where(d > 0, (blocks / d).round(), 0).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales, None


def unpack(packed: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """The integers of each block as float [N, K/32, 32] (Q4_1: low nibbles, then high)."""
    if fmt.bits == 8:
        return packed.float()
    return torch.cat((packed & 15, packed >> 4), dim=-1).float()


def dequantize(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, fmt: BlockFormat
) -> torch.Tensor:
    """The float32 weight [N, K] the blocks stand for (gguf's own formula: d*q (+ m))."""
    values = unpack(packed, fmt) * scales.float()[..., None]
    if mins is not None:
        values = values + mins.float()[..., None]
    return values.flatten(1)


def block_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    fmt: BlockFormat,
) -> torch.Tensor:
    """`x @ dequantize(...).T` for a few rows, written so inductor fuses it into one pass over
    the packed bytes (unpack, scale, multiply, accumulate; measured fastest of five forms on a
    2-core AVX-512 CPU: ~15 GB/s of Q4_1 blocks, vs ~17 GB/s for an fp32 matmul of 6.4x the
    bytes). x: [M, K] float32; returns [M, N]. Leading dims broadcast: packed [E, N, K/32, w]
    (several matrices, e.g. a token's experts) with x [1, K] or [E, K] gives [E, N]."""
    n_blocks = packed.shape[-2]
    xb = x.reshape(*x.shape[:-1], 1, n_blocks, 2, BLOCK // 2)
    if fmt.bits == 8:
        q = packed.view(*packed.shape[:-1], 2, BLOCK // 2).float()
        dot = (q[..., 0, :] * xb[..., 0, :] + q[..., 1, :] * xb[..., 1, :]).sum(-1)
        return (dot * scales.float()).sum(-1)
    d, m = scales.float()[..., None], mins.float()[..., None]
    low = (packed & 15).float() * d + m
    high = (packed >> 4).float() * d + m
    return (low * xb[..., 0, :] + high * xb[..., 1, :]).sum((-2, -1))


@functools.cache
def _compiled(fn: Callable[..., torch.Tensor], shape: tuple[Any, ...]) -> Callable[..., Any]:
    """`fn` compiled for one weight shape; if compiling fails (inductor needs a C++ compiler on
    a CPU, which slim images lack) it warns once and runs `fn` eagerly from then on: slower,
    same results."""
    current = torch.compile(own_copy(fn), dynamic=False)

    def call(*args: Any) -> Any:
        nonlocal current
        try:
            return current(*args)
        except Exception as exc:  # noqa: BLE001 - inductor raises many kinds; all mean the same
            if current is fn:
                raise
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            log.warning(
                "torch.compile could not compile %s for %s (%s: %s); running it eagerly",
                fn.__name__,
                shape,
                type(exc).__name__,
                first,
            )
            current = fn
            return fn(*args)

    return call


def kernel(fn: Callable[..., torch.Tensor], shape: tuple[Any, ...]) -> Callable[..., Any]:
    """`fn` compiled on its own, one kernel per weight `shape` (cached on disk by inductor), when
    called eagerly; `fn` itself inside a graph being compiled, where it fuses with its
    neighbours. Eagerly, `dequantize` costs 4 ms for a 3072x576 weight, compiled 1 ms."""
    return fn if torch.compiler.is_compiling() else _compiled(fn, shape)


def eager_or_op(function: Callable[..., Any], op: Callable[..., Any]) -> Callable[..., Any]:
    """A C kernel's torch `op` inside a graph being compiled (no graph break) and wherever the
    op's CPU kernel is C++; the ctypes `function` itself where the op would only add its
    dispatch (~5 us a call) in front of that function (`operators.native.ops`)."""
    if torch.compiler.is_compiling() or native_ops.kernels == "C++":
        return op
    return function


@torch.compiler.assume_constant_result
def native_available() -> bool:
    """Whether the C kernels are built (decided once; a compiled graph bakes the answer in)."""
    return native.library() is not None


# float32 rows (a decode batch, a new chat turn's few tokens) that the C dot kernels take on a
# CPU: against torch's matmul on a 2-core AVX-512 EPYC 1.3-2.1x at 8 rows, 1.0-1.5x at 16,
# 0.9-1.4x at 24, 0.7-1.2x at 32 (SmolLM2 and Llama-3-8B shapes); on an AVX2 EPYC 1.3-3.1x at
# 8 rows, 0.9-2.5x at 16
DENSE_ROWS = 16


class DecodeLinear(nn.Linear):
    """`nn.Linear` whose decode-sized products on a CPU (float32, up to DENSE_ROWS rows, no
    autograd) go through the C dot kernels of `operators.native`: torch's GEMV streamed a
    float32 weight at 11-17 GB/s on a 2-core AVX-512 EPYC, these at 26-33 GB/s (on an AVX2 one
    that reads ~19 GB/s: torch up to ~9, these 12-19), and the projections and lm_head are most
    of an eager CPU decode step. Everything else is `nn.Linear`'s forward. The engine turns plain
    linears into these (`decode_linears`), keeping their parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (
            rows <= DENSE_ROWS
            and x.dtype == self.weight.dtype == torch.float32
            and self.weight.device.type == "cpu"
            and not torch.is_grad_enabled()
            and native_available()
        ):
            matmul = eager_or_op(native.dense_matmul, native_ops.dense_matmul)
            out = matmul(x.reshape(rows, self.in_features), self.weight)
            if self.bias is not None:
                out += self.bias
            return out.reshape(*x.shape[:-1], self.out_features)
        return super().forward(x)


def decode_linears(model: nn.Module) -> int:
    """Turn every plain float32 `nn.Linear` on a CPU whose input width the kernels take (a
    multiple of 32) into a `DecodeLinear`: the same module with the same parameters (tied
    weights stay tied), only its forward differs. Returns how many changed."""
    changed = 0
    for module in model.modules():
        if (
            type(module) is nn.Linear
            and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32
            and module.in_features % BLOCK == 0
        ):
            module.__class__ = DecodeLinear
            changed += 1
    if changed:
        native.build_for("cpu")
    return changed


def block_linear(
    x: torch.Tensor,
    blocks: Blocks,
    fmt: BlockFormat,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`x [..., K] @ W.T` for the weight W [N, K] that `blocks` (packed, scales, mins) stand
    for, computed and returned in `dtype`. On a CPU the C kernel takes it (`operators.native`;
    outside fp32 up to NATIVE_ROWS rows). Elsewhere, or without a C compiler, up to GEMV_ROWS
    rows stream the packed bytes (one compiled GEMV per row when called eagerly: a kernel per
    row count would be compiled otherwise, and dynamo keeps at most 8 per function; all rows at
    once inside a graph being compiled, where it fuses). More rows dequantize W once and
    multiply."""
    packed, scales, mins = blocks
    in_features = packed.shape[1] * BLOCK
    out_features = packed.shape[0]
    rows = x.numel() // in_features
    shape = (out_features, in_features, fmt.name, packed.device)
    c_kernel_rows = dtype == torch.float32 or rows <= NATIVE_ROWS
    if packed.device.type == "cpu" and c_kernel_rows and native_available():
        matmul = eager_or_op(native.block_matmul, native_ops.block_matmul)
        out = matmul(x.reshape(rows, in_features).float(), packed, scales, mins)
        return out.to(dtype).reshape(*x.shape[:-1], out_features)
    if rows <= GEMV_ROWS:
        flat = x.reshape(rows, in_features).float()
        gemv = kernel(block_gemv, shape)
        if torch.compiler.is_compiling() or rows == 1:
            out = gemv(flat, packed, scales, mins, fmt)
        else:
            out = torch.cat([gemv(flat[r : r + 1], packed, scales, mins, fmt) for r in range(rows)])
        return out.to(dtype).reshape(*x.shape[:-1], out_features)
    weight = kernel(dequantize_as, (*shape, dtype))(packed, scales, mins, fmt, dtype)
    return F.linear(x, weight)


def dequantize_as(
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    fmt: BlockFormat,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`dequantize` straight to `dtype`: compiled, a bf16 weight is written once, not first as
    float32 and then cast (a third of the bytes)."""
    return dequantize(packed, scales, mins, fmt).to(dtype)


class BlockQuantLinear(Operator):
    """Drop-in for `nn.Linear` (any float dtype) holding its weight in a GGUF block format.

    Rule kwargs: `format: q4_1` (default) or `q8_0`. The input feature count must be a multiple
    of 32. Checkpoints load unchanged: a `weight` key is quantized as it arrives.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        fmt: BlockFormat,
        dtype: torch.dtype,
        bias: nn.Parameter | None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.compute_dtype = dtype  # compute and output dtype: the replaced layer's
        n_blocks = in_features // BLOCK
        shape = (out_features, n_blocks)
        packed = torch.empty((*shape, fmt.packed_width), dtype=fmt.packed_dtype, device=device)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", torch.empty(shape, dtype=torch.float16, device=device))
        mins = torch.empty(shape, dtype=torch.float16, device=device) if fmt.has_min else None
        self.register_buffer("mins", mins)
        self.bias = bias
        self.register_load_state_dict_pre_hook(self._quantize_on_load)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        name: str,
        config: Any,
        device: torch.device | None,
        format: str = "q4_1",  # noqa: A002 - the rule file's key
        **kwargs: Any,
    ) -> Self:
        if kwargs:
            raise TypeError(f"BlockQuantLinear takes only the kwarg 'format', got {sorted(kwargs)}")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{type(module).__name__} is not an nn.Linear")
        fmt = FORMATS.get(str(format).lower())
        if fmt is None:
            raise ValueError(f"format {format!r} is not one of {sorted(FORMATS)}")
        if module.in_features % BLOCK:
            raise ValueError(
                f"in_features {module.in_features} is not a multiple of the block size {BLOCK}"
            )
        weight = module.weight
        target = device if device is not None and not weight.is_meta else weight.device
        bias = module.bias
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(target), requires_grad=False)
        new = cls(
            module.in_features,
            module.out_features,
            fmt=fmt,
            dtype=weight.dtype,
            bias=bias,
            device=target,
        )
        if not weight.is_meta:
            new.set_weight(weight)
        native.build_for(device or target)
        return new

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` [out, in] into this layer's blocks."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit "
                f"[{self.out_features}, {self.in_features}]"
            )
        packed, scales, mins = quantize_blocks(weight.to(self.packed.device), self.fmt)
        self.packed, self.scales = packed, scales
        if mins is not None:
            self.mins = mins

    def _quantize_on_load(self, _: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        weight = state_dict.pop(f"{prefix}weight", None)
        if weight is None:
            return
        packed, scales, mins = quantize_blocks(weight, self.fmt)
        native.build_for(weight.device)
        state_dict[f"{prefix}packed"], state_dict[f"{prefix}scales"] = packed, scales
        if mins is not None:
            state_dict[f"{prefix}mins"] = mins

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_as(self.packed, self.scales, self.mins, self.fmt, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = block_linear(x, (self.packed, self.scales, self.mins), self.fmt, self.compute_dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        shape = f"{self.in_features}, {self.out_features}"
        return f"{shape}, format={self.fmt.name}, dtype={self.compute_dtype}"


def linear_dtype_device(layer: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Compute dtype and device of an `nn.Linear` or a `BlockQuantLinear` (operators that own
    projections size their caches from them)."""
    if isinstance(layer, BlockQuantLinear):
        return layer.compute_dtype, layer.device
    return layer.weight.dtype, layer.weight.device


def native_projection(linear: nn.Module) -> tuple[list[torch.Tensor | None], int] | None:
    """`linear` as `operators.native.ops.decode_layer` takes a projection, [weight or packed
    blocks, scales, mins, bias], and the most float32 rows for which its own forward calls the
    C kernels (so the layer's one call computes the same values); None where it never does.
    Weights elsewhere than on a CPU never build the kernels (a GPU model's engine asks too)."""
    if type(linear) is DecodeLinear:
        if not native.cpu_float32(linear.weight):
            return None
        projection = [linear.weight, None, None, linear.bias], DENSE_ROWS
    elif isinstance(linear, BlockQuantLinear):
        if linear.compute_dtype != torch.float32 or linear.device.type != "cpu":
            return None
        projection = [linear.packed, linear.scales, linear.mins, linear.bias], sys.maxsize
    else:
        return None
    return projection if native_available() else None
