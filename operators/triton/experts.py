"""MoE experts of a decode step read in place: each token's top-k experts multiplied where their
weights lie, the expert ids read on the device.

Why this exists
---------------
A captured decode step cannot read the routing on the host, so `operators.experts` computes a
decode token's experts by indexing the weights with the routing
(:func:`gathered_experts_reference`): torch materialises a copy of each selected expert's
matrices, then reads the copy. For Qwen3-30B-A3B that is 3.6 GB of expert weights per token
moved three times (read, write, read) instead of read once. Here two launches do the whole MLP of
every (token, expert) pair without copies:

* :func:`gathered_experts`, launch 1: per pair, the gate and up rows of its expert times the
  token, ``silu(gate) * up`` in the epilogue (the ``[T, k, I]`` intermediate is all it writes);
* launch 2: per token, its k experts' down projections, each weighted by its routing weight and
  summed in fp32, written once.

Expert ids come from the router's ``top_k_index`` on the device, so the grid depends on shapes
only (CUDA-graph safe). Any number of tokens works; each pair reads its expert's whole matrices,
so for many tokens (prefill) the grouped loop in `operators.experts` reads less.

Numerics
--------
As Hugging Face's experts loop: the projections' outputs, ``silu(gate)`` and the SiLU product are
rounded to the activations' dtype where HF materialises them; each weighted expert output is
rounded when activations and routing weights share a 16-bit dtype (torch's promotion), and the k
of them are summed in fp32 and rounded once, like the reference. Differences from HF are the fp32
accumulation order of the products and, at the tolerance of 16-bit outputs, the order of the
k-sum (HF adds experts one at a time into a 16-bit output).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from operators.triton.fused import _check_triton_call, _check_unit_stride, triton
from operators.triton.gemv import TILE_ELEMENTS, single_row_tile

if triton is not None:
    import triton.language as tl

__all__ = ["gathered_experts", "gathered_experts_reference"]


def gathered_experts_reference(
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """Each token through its own k experts, as batched matrix-vector products over the weights
    of those experts gathered by `index` (no value read on the host; torch copies the gathered
    weights)."""
    gate_up = gate_up_proj[index] @ hidden[:, None, :, None]  # [T, k, 2I, 1]
    gate, up = gate_up[..., 0].chunk(2, dim=-1)
    inner = act_fn(gate) * up  # [T, k, I]
    out = (down_proj[index] @ inner[..., None])[..., 0]  # [T, k, H]
    return (out * weights[..., None]).sum(1).to(hidden.dtype)


if triton is not None:

    @triton.jit
    def _row_products(
        acc, w_rows, a_ptr, offs_kb, n_mask, K, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr
    ):
        # acc [BLOCK_N, BLOCK_K] += weight rows (pointers w_rows, [BLOCK_N, 1]) * the vector a,
        # tile by tile along K; the caller reduces once at the end (the weight tile never moves
        # between threads).
        for t in range(K_TILES):
            offs_k = t * BLOCK_K + offs_kb
            k_mask = offs_k < K
            a = tl.load(a_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
            acc += w.to(tl.float32) * a[None, :]
        return acc

    @triton.jit
    def _gate_up_kernel(
        x_ptr,
        index_ptr,
        w_ptr,
        inner_ptr,
        INTER,
        H,
        stride_xt,
        stride_we,
        stride_wn,
        TOP_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_TILES: tl.constexpr,
    ):
        pair = tl.program_id(0)  # token * TOP_K + choice
        dtype = x_ptr.dtype.element_ty
        expert = tl.load(index_ptr + pair).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < INTER
        offs_kb = tl.arange(0, BLOCK_K)
        gate_rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
        x_row = x_ptr + (pair // TOP_K) * stride_xt
        zero = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        gate = _row_products(zero, gate_rows, x_row, offs_kb, n_mask, H, BLOCK_K, K_TILES)
        up_rows = gate_rows + INTER * stride_wn
        up = _row_products(zero, up_rows, x_row, offs_kb, n_mask, H, BLOCK_K, K_TILES)
        gate = tl.sum(gate, axis=1).to(dtype).to(tl.float32)
        up = tl.sum(up, axis=1).to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(inner_ptr + pair * INTER + offs_n, (act * up).to(dtype), mask=n_mask)

    @triton.jit
    def _down_kernel(
        inner_ptr,
        index_ptr,
        routing_ptr,
        w_ptr,
        out_ptr,
        H,
        INTER,
        stride_we,
        stride_wn,
        stride_ot,
        TOP_K: tl.constexpr,
        ROUND_WEIGHTED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_TILES: tl.constexpr,
    ):
        token = tl.program_id(0)
        dtype = inner_ptr.dtype.element_ty
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        offs_kb = tl.arange(0, BLOCK_K)
        total = tl.zeros([BLOCK_N], tl.float32)
        for choice in tl.static_range(TOP_K):
            pair = token * TOP_K + choice
            expert = tl.load(index_ptr + pair).to(tl.int64)
            rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            acc = _row_products(
                acc, rows, inner_ptr + pair * INTER, offs_kb, n_mask, INTER, BLOCK_K, K_TILES
            )
            out = tl.sum(acc, axis=1).to(dtype).to(tl.float32)
            weighted = out * tl.load(routing_ptr + pair).to(tl.float32)
            if ROUND_WEIGHTED:  # 16-bit activations and routing weights: torch rounds this
                weighted = weighted.to(dtype).to(tl.float32)
            total += weighted
        tl.store(out_ptr + token * stride_ot + offs_n, total.to(dtype), mask=n_mask)


def gathered_experts(
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """:func:`gathered_experts_reference` with SiLU experts, in two launches that read each
    selected expert's weights in place.

    Args:
        hidden: ``[T, H]`` activations, last dim contiguous.
        index: ``[T, k]`` expert ids (integers in ``[0, E)``, as the router gives them).
        weights: ``[T, k]`` routing weights (any float dtype).
        gate_up_proj: ``[E, 2I, H]`` (gate rows, then up rows), down_proj ``[E, H, I]``; both in
            ``hidden``'s dtype with contiguous last dims.

    Returns a new ``[T, H]`` tensor in ``hidden``'s dtype. No host synchronisation.
    """
    _check_operands(hidden, index, weights, gate_up_proj, down_proj)
    tokens, top_k = index.shape
    experts, hidden_dim, inter = down_proj.shape
    index, weights = index.contiguous(), weights.contiguous()
    inner = torch.empty((tokens, top_k, inter), dtype=hidden.dtype, device=hidden.device)
    out = torch.empty((tokens, hidden_dim), dtype=hidden.dtype, device=hidden.device)
    if tokens == 0 or top_k == 0:
        return out.zero_()
    # two matrices per program in launch 1: half the weights per step each
    block_n, block_k = single_row_tile(
        tokens * top_k, inter, hidden_dim, hidden.device, TILE_ELEMENTS // 2
    )
    _gate_up_kernel[(tokens * top_k, triton.cdiv(inter, block_n))](
        hidden,
        index,
        gate_up_proj,
        inner,
        inter,
        hidden_dim,
        hidden.stride(0),
        gate_up_proj.stride(0),
        gate_up_proj.stride(1),
        TOP_K=top_k,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        K_TILES=triton.cdiv(hidden_dim, block_k),
        num_warps=4,
    )
    block_n, block_k = single_row_tile(tokens, hidden_dim, inter, hidden.device)
    _down_kernel[(tokens, triton.cdiv(hidden_dim, block_n))](
        inner,
        index,
        weights,
        down_proj,
        out,
        hidden_dim,
        inter,
        down_proj.stride(0),
        down_proj.stride(1),
        out.stride(0),
        TOP_K=top_k,
        ROUND_WEIGHTED=torch.promote_types(hidden.dtype, weights.dtype) != torch.float32,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        K_TILES=triton.cdiv(inter, block_k),
        num_warps=4,
    )
    return out


def _check_operands(
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> None:
    fn = "gathered_experts"
    _check_triton_call(fn, hidden, index, weights, gate_up_proj, down_proj)
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3 or hidden.dim() != 2:
        raise ValueError(
            f"{fn}: hidden must be [T, H], gate_up_proj [E, 2I, H] and down_proj [E, H, I], got "
            f"{tuple(hidden.shape)}, {tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}"
        )
    experts, hidden_dim, inter = down_proj.shape
    tokens = hidden.shape[0]
    if gate_up_proj.shape != (experts, 2 * inter, hidden_dim) or hidden.shape[1] != hidden_dim:
        raise ValueError(
            f"{fn}: gate_up_proj must be {(experts, 2 * inter, hidden_dim)} and hidden "
            f"[T, {hidden_dim}] for down_proj {tuple(down_proj.shape)}, got "
            f"{tuple(gate_up_proj.shape)} and {tuple(hidden.shape)}"
        )
    if index.dim() != 2 or index.shape[0] != tokens or weights.shape != index.shape:
        raise ValueError(
            f"{fn}: index and weights must both be [{tokens}, k], got {tuple(index.shape)} and "
            f"{tuple(weights.shape)}"
        )
    if (
        index.dtype.is_floating_point
        or index.dtype.is_complex
        or not weights.dtype.is_floating_point
    ):
        raise TypeError(
            f"{fn}: index must hold integers and weights floats, got {index.dtype} and "
            f"{weights.dtype}"
        )
    if not (hidden.dtype == gate_up_proj.dtype == down_proj.dtype) or hidden.dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        raise TypeError(
            f"{fn} needs one float dtype for hidden and the expert weights, got {hidden.dtype}, "
            f"{gate_up_proj.dtype}, {down_proj.dtype}"
        )
    _check_unit_stride(fn, hidden=hidden, gate_up_proj=gate_up_proj, down_proj=down_proj)
