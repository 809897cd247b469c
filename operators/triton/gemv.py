"""Decode-time projections with their cheap neighbours folded in: the RMSNorm (and the residual
add before it) that feeds a projection, and SiLU-and-mul before the down projection with the
residual add after it.

Why this exists
---------------
A decoder layer of a small model at batch 1 is bound by kernel launches, not bytes (see
``fused.py``). After ``fused.py`` a Llama-style layer still launches eleven kernels per decode
step; the norm, SiLU-and-mul and residual add among them each cost about as much as a projection
of SmolLM2-135M (1-2 us against ~4 us on an H200, 2026-11-27 profile) while doing almost no work.
Here they run inside the matrix-vector product that consumes (or produces) their result:

* :func:`norm_linear`: ``linear(rms_norm(residual + x))``, also returning ``residual + x``
  (the q/k/v and gate/up projections with the norm before them);
* :func:`silu_linear`: ``residual + linear(silu(gate) * up)`` (the down projection and the
  residual add that closes the layer).

Every program recomputes the norm statistics of its rows from the whole input row (a few KiB,
served from cache) so no second launch is needed; program 0 alone writes the new residual.

Which path is faster depends on the card and the shapes and nobody should guess: the engine
captures the decode step both ways and keeps the faster graph (see ``ktinject.engine``).
:func:`fused_gemv_preferred` is the switch it flips while capturing; the environment variable
``KTINJECT_FUSED_GEMV=1`` / ``0`` pins the choice for A/B runs by hand.

Numerics
--------
The inputs of the product are rounded exactly where Hugging Face materialises them (the residual
sum, the normalised activations, the weighted norm output, ``silu(gate)``, the SiLU product), so
the differences from HF are the order of the fp32 accumulation inside the product (cuBLAS uses
its own) and, as in ``fused.py``, a few fp32 ulps of ``rsqrt`` / ``exp``. The ``*_reference``
functions are HF's ops in HF's order: the CPU path and the test oracle.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from operators.triton.fused import (
    _check_triton_call,
    _check_unit_stride,
    _next_pow2,
    _rows,
    add_rms_norm_reference,
    interpreted,
    rms_norm_reference,
    silu_mul_reference,
    triton,
)

if triton is not None:
    import triton.language as tl

__all__ = [
    "MAX_ROWS",
    "fused_gemv_pinned",
    "fused_gemv_preferred",
    "norm_linear",
    "norm_linear_reference",
    "prefer_fused_gemv",
    "silu_linear",
    "silu_linear_reference",
]

MAX_ROWS = 16  # rows (decode batch) one program multiplies at once
TILE_ELEMENTS = 4096  # weight elements one program loads per step at batch 1 (8 KiB in bf16)

_PINNED = os.environ.get("KTINJECT_FUSED_GEMV", "").strip()
_preferred = False


def fused_gemv_preferred() -> bool:
    """Whether decoder layers should take the fused-projection path right now."""
    if _PINNED in ("0", "1"):
        return _PINNED == "1"
    return _preferred


def fused_gemv_pinned() -> bool | None:
    """The choice forced by ``KTINJECT_FUSED_GEMV``, or None when the engine may choose."""
    return None if _PINNED not in ("0", "1") else _PINNED == "1"


@contextmanager
def prefer_fused_gemv(on: bool) -> Iterator[None]:
    """Within the block, layers take the fused path when ``on`` (unless pinned by the env)."""
    global _preferred
    saved, _preferred = _preferred, on
    try:
        yield
    finally:
        _preferred = saved


# ---------------------------------------------------------------- torch references (HF numerics)


def norm_linear_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(linear(rms_norm(residual + x)), residual + x)``; without ``residual``,
    ``(linear(rms_norm(x)), None)``. Hugging Face's ops in Hugging Face's order."""
    if residual is None:
        normed, new_residual = rms_norm_reference(x, norm_weight, eps), None
    else:
        normed, new_residual = add_rms_norm_reference(x, residual, norm_weight, eps)
    return F.linear(normed, weight, bias), new_residual


def silu_linear_reference(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + linear(silu(gate) * up)`` (no add without ``residual``), as HF computes it."""
    out = F.linear(silu_mul_reference(gate_up), weight, bias)
    return out if residual is None else residual + out


# ---------------------------------------------------------------- kernel

_NORM, _ADD_NORM, _SILU_MUL = "norm", "add-norm", "silu-mul"  # what runs before the product

if triton is not None:

    @triton.jit
    def _input_tile(x_ptr, res_ptr, offs_m, offs_k, mask, stride_xm, stride_rm, ADD: tl.constexpr):
        # fp32 values of the product's input before any norm: x, or residual + x rounded to the
        # input dtype like HF's `hidden_states = residual + hidden_states`.
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        if ADD:
            r = tl.load(
                res_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mask, other=0.0
            )
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x_ptr.dtype.element_ty)
        return x.to(tl.float32)

    @triton.jit
    def _product_input(
        x_ptr,
        res_ptr,
        nw_ptr,
        res_out_ptr,
        offs_m,
        offs_k,
        m_mask,
        k_mask,
        rstd,
        K,
        write_residual,
        stride_xm,
        stride_rm,
        stride_rom,
        NORMED: tl.constexpr,
        ADD_IN: tl.constexpr,
        SILU_MUL: tl.constexpr,
    ):
        # One [rows, BLOCK_K] tile of what the projection multiplies, in fp32, rounded to the
        # input dtype at each point where HF materialises a tensor.
        dtype = x_ptr.dtype.element_ty
        mask = m_mask[:, None] & k_mask[None, :]
        if SILU_MUL:
            row = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
            g = tl.load(row, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(row + K, mask=mask, other=0.0).to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
            a = (act * u).to(dtype).to(tl.float32)
        else:
            a = _input_tile(x_ptr, res_ptr, offs_m, offs_k, mask, stride_xm, stride_rm, ADD_IN)
            if ADD_IN:  # the new residual stream, written by one program
                dst = res_out_ptr + offs_m[:, None] * stride_rom + offs_k[None, :]
                tl.store(dst, a.to(dtype), mask=mask & write_residual)
            if NORMED:
                nw = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                normed = (a * rstd[:, None]).to(dtype).to(tl.float32)
                a = (nw[None, :] * normed).to(dtype).to(tl.float32)
        return a

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        res_ptr,
        nw_ptr,
        w_ptr,
        b_ptr,
        add_ptr,
        y_ptr,
        res_out_ptr,
        M,
        N,
        K,
        eps,
        stride_xm,
        stride_rm,
        stride_wn,
        stride_am,
        stride_ym,
        stride_rom,
        NORMED: tl.constexpr,
        ADD_IN: tl.constexpr,
        SILU_MUL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ADD_OUT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_TILES: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        dtype = x_ptr.dtype.element_ty
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_kb = tl.arange(0, BLOCK_K)

        rstd = tl.zeros([BLOCK_M], tl.float32)
        if NORMED:  # the rows' mean squares, over the whole row
            sumsq = tl.zeros([BLOCK_M], tl.float32)
            for t in range(K_TILES):
                offs_k = t * BLOCK_K + offs_kb
                mask = m_mask[:, None] & (offs_k < K)[None, :]
                h = _input_tile(x_ptr, res_ptr, offs_m, offs_k, mask, stride_xm, stride_rm, ADD_IN)
                sumsq += tl.sum(h * h, axis=1)
            rstd = tl.math.rsqrt(sumsq / K + eps)

        # One row (batch-1 decode): multiply in the weight tile's own layout and reduce once at
        # the end, so the weight never moves between threads. More rows: tensor-core dot
        # products on 16-row tiles (BLOCK_M is then 16).
        if BLOCK_M == 1:
            acc_wide = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for t in range(K_TILES):
            offs_k = t * BLOCK_K + offs_kb
            k_mask = offs_k < K
            a = _product_input(
                x_ptr,
                res_ptr,
                nw_ptr,
                res_out_ptr,
                offs_m,
                offs_k,
                m_mask,
                k_mask,
                rstd,
                K,
                pid == 0,
                stride_xm,
                stride_rm,
                stride_rom,
                NORMED,
                ADD_IN,
                SILU_MUL,
            )
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if BLOCK_M == 1:
                acc_wide += w.to(tl.float32) * a
            elif DOT_FP32:  # fp32 weights, or the interpreter (its bf16 dot is wrong)
                acc += tl.dot(a, tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:  # a's values are already rounded to the dtype: the products stay exact
                acc += tl.dot(a.to(dtype), tl.trans(w))
        if BLOCK_M == 1:
            acc = tl.sum(acc_wide, axis=1)[None, :]

        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = acc.to(dtype)
        out_mask = m_mask[:, None] & n_mask[None, :]
        if ADD_OUT:  # HF: residual + down_proj(...), the projection rounded first
            r = tl.load(
                add_ptr + offs_m[:, None] * stride_am + offs_n[None, :], mask=out_mask, other=0.0
            )
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=out_mask)


# ---------------------------------------------------------------- entry points


def _check_operands(fn: str, x: torch.Tensor, weight: torch.Tensor, k: int, **others) -> None:
    tensors = {"x": x, "weight": weight, **{n: t for n, t in others.items() if t is not None}}
    _check_triton_call(fn, *tensors.values())
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        named = ", ".join(f"{n} {t.dtype}" for n, t in tensors.items())
        raise TypeError(f"{fn} needs one float dtype for all operands, got {named}")
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"{fn}: weight must be [N, {k}], got {tuple(weight.shape)}")
    _check_unit_stride(fn, weight=weight)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows > MAX_ROWS:
        raise ValueError(f"{fn} multiplies at most {MAX_ROWS} rows, got {rows}")


def _tiles(
    rows: int, n: int, k: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K). At small-model shapes the product is latency bound
    (SmolLM2's down projection has 576 outputs), so programs take long strides along K to need
    few steps. Several rows: 16x16 tensor-core tiles, 256 deep (64 for fp32, whose FMA products
    spill registers deeper on sm_90). One row: output rows per program shrink until there are
    two programs per SM, each step loading TILE_ELEMENTS weights."""
    if rows > 1:
        depth = 64 if dtype == torch.float32 else 256
        return 16, 16, max(16, min(depth, _next_pow2(k)))
    return 1, *single_row_tile(1, n, k, device)


def single_row_tile(
    groups: int, n: int, k: int, device: torch.device, elements: int = TILE_ELEMENTS
) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of a batch-1 product of `groups` independent [n, k] matrices: output
    rows per program shrink from 16 until there are two programs per SM, each step loading
    `elements` weights (K strides long, so latency-bound small products need few steps)."""
    programs = 2 * _sm_count(device)
    block_n = 16
    while block_n > 1 and groups * triton.cdiv(n, block_n) < programs:
        block_n //= 2
    return block_n, max(16, min(elements // block_n, _next_pow2(k)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # an H100/H200's count; only tile sizes depend on it
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(
    prologue: str,
    x: torch.Tensor,
    k: int,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    bias: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    x2 = _rows("gemv", x)
    rows, n = x2.shape[0], weight.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    res_out = None
    if residual is not None:
        res_out = torch.empty((*x.shape[:-1], k), dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return y, res_out
    y2 = y.view(rows, n)
    r2 = _rows("gemv", residual) if residual is not None else x2
    a2 = _rows("gemv", add) if add is not None else y2
    ro2 = res_out.view(rows, k) if res_out is not None else y2
    block_m, block_n, block_k = _tiles(rows, n, k, x.dtype, x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x2,
        r2,
        norm_weight if norm_weight is not None else weight,
        weight,
        bias if bias is not None else weight,
        a2,
        y2,
        ro2,
        rows,
        n,
        k,
        float(eps),
        x2.stride(0),
        r2.stride(0),
        weight.stride(0),
        a2.stride(0),
        y2.stride(0),
        ro2.stride(0),
        NORMED=prologue in (_NORM, _ADD_NORM),
        ADD_IN=prologue == _ADD_NORM,
        SILU_MUL=prologue == _SILU_MUL,
        HAS_BIAS=bias is not None,
        ADD_OUT=add is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        K_TILES=triton.cdiv(k, block_k),
        DOT_FP32=x.dtype == torch.float32 or interpreted(),
        num_warps=4,
    )
    return y, res_out


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`norm_linear_reference` in one launch, for at most :data:`MAX_ROWS` rows.

    Args:
        x: ``[..., K]`` activations, last dim contiguous.
        residual: the residual stream to add to ``x`` first (same shape), or None.
        norm_weight: ``[K]`` RMSNorm weight; ``eps`` its epsilon.
        weight: ``[N, K]`` projection weight, contiguous rows; ``bias`` ``[N]`` or None.

    All operands share one dtype. Returns new contiguous ``y`` ``[..., N]`` and, with a
    residual, the new residual ``[..., K]``. Grid ``(cdiv(N, 16),)``; CUDA-graph safe.
    """
    k = x.shape[-1]
    _check_operands(
        "norm_linear", x, weight, k, residual=residual, norm_weight=norm_weight, bias=bias
    )
    if norm_weight.shape != (k,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(
            f"norm_linear: norm_weight must be [{k}] and residual like x {tuple(x.shape)}; got "
            f"{tuple(norm_weight.shape)} and "
            f"{None if residual is None else tuple(residual.shape)}"
        )
    prologue = _NORM if residual is None else _ADD_NORM
    return _launch(
        prologue, x, k, weight, residual=residual, norm_weight=norm_weight, eps=eps, bias=bias
    )


def silu_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`silu_linear_reference` in one launch, for at most :data:`MAX_ROWS` rows.

    ``gate_up`` is ``[..., 2I]`` (gate then up, last dim contiguous), ``weight`` ``[N, I]``,
    ``residual`` ``[..., N]`` or None; one dtype for all. Returns a new ``[..., N]`` tensor.
    """
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2I], got shape {tuple(gate_up.shape)}")
    k = gate_up.shape[-1] // 2
    _check_operands("silu_linear", gate_up, weight, k, residual=residual, bias=bias)
    if residual is not None and residual.shape != (*gate_up.shape[:-1], weight.shape[0]):
        raise ValueError(
            f"silu_linear: residual must be {(*gate_up.shape[:-1], weight.shape[0])}, got "
            f"{tuple(residual.shape)}"
        )
    y, _ = _launch(_SILU_MUL, gate_up, k, weight, bias=bias, add=residual)
    return y
