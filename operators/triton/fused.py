"""One-kernel versions of the small elementwise steps of a decoder layer (RMSNorm, residual add +
RMSNorm, SiLU-and-mul, rotary embedding, the decode-time K/V cache write), each beside a
pure-torch reference.

Why this exists
---------------
Batch-1 decode of a small model inside a CUDA graph is bound by the *number of kernels* per layer,
not by bytes: SmolLM2-135M moves a few hundred KiB per layer, so every launch costs about as much
as the work it does.  Hugging Face spends many kernels on cheap steps:

* ``LlamaRMSNorm``: cast to fp32, square, mean, add eps + rsqrt, multiply, cast back, multiply by
  the weight (4+ kernels);
* the residual add before the post-attention norm (1 more);
* ``apply_rotary_pos_emb`` with ``rotate_half`` (slice, neg, cat, 4 muls, 2 adds for q and k,
  ~8 kernels);
* ``act_fn(gate) * up`` (2 kernels);
* writing one token's K and V into the static cache by advanced indexing (several kernels each).

Each becomes exactly one launch here: :func:`rms_norm`, :func:`add_rms_norm` (the residual add
fused into the norm that follows it), :func:`silu_mul`, :func:`rope` (q and k in one launch) and
:func:`write_kv` (K and V in one launch).

Numerics
--------
Every ``*_reference`` function performs Hugging Face's operations in Hugging Face's order and
dtypes, so it is bit-identical to the module/function it mirrors (tests prove it) and serves both
as the CPU path and as the test oracle (eager float32 CPU calls take the C++ operators of
``operators/native/layer_ops.cpp`` instead, bit-identical to these references). The kernels round
at the same points as Hugging Face: intermediate results that HF materialises in the input dtype
(the normalised activations before the weight multiply, the residual sum, ``silu(gate)``, each
product of the rotary embedding) are rounded to that dtype before they are used. Products of two
bf16/fp16 values are exact in fp32, so with round-to-nearest-even casts (the GPU's) the weight
multiply, the residual add and the whole rotary embedding are bit-exact with HF; the reductions
(sum of squares) and transcendental functions (``rsqrt``, ``exp``) differ from torch's by a few
fp32 ulps, which can flip the last bit of a bf16/fp16 result. The rotary kernel is launched with
fp-contraction off, so fp32 results are also bit-exact (no fused multiply-add). Under
``TRITON_INTERPRET=1`` fp32->bf16 casts truncate instead of rounding, so interpreted bf16 results
may be one ulp off.

Constraints of every kernel
---------------------------
* **CUDA-graph safe**: only shapes, strides and dtypes are inspected on the host (no ``.item()``,
  no synchronisation), grids are pure functions of shapes, outputs are allocated from shapes.
* fp32, bf16 and fp16 inputs; the innermost dimension must be contiguous (stride 1), other
  dimensions may have any strides (e.g. the q/k views of a fused qkv projection).
* Inference only: no autograd.  :func:`use_triton` keeps the choice of path in one place.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Triton is optional: the torch references must stay importable without it (e.g. macOS).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "interpreted",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "rope_write_kv",
    "silu_mul",
    "silu_mul_reference",
    "use_triton",
    "write_kv",
    "write_kv_reference",
]

MAX_NORM_DIM = 8192  # largest last dim of rms_norm/add_rms_norm (one program holds a whole row)
MAX_ROPE_HEAD_DIM = 512
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Set KTINJECT_DISABLE_TRITON=1 to force the torch references everywhere (debugging, A/B checks).
_DISABLED = os.environ.get("KTINJECT_DISABLE_TRITON", "").strip().lower() not in ("", "0", "false")


def use_triton(t: torch.Tensor) -> bool:
    """Whether operators should run the Triton kernels of this module on ``t``.

    True when ``t`` lives on a CUDA device, triton is importable, the kernels are not disabled by
    ``KTINJECT_DISABLE_TRITON=1`` and no gradient is needed for ``t`` (the kernels have no
    backward).  Everything else (CPU tensors, training) takes the ``*_reference`` torch path.
    """
    return (
        t.is_cuda
        and triton is not None
        and not _DISABLED
        and not (t.requires_grad and torch.is_grad_enabled())
    )


# ---------------------------------------------------------------- torch references (HF numerics)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face ``LlamaRMSNorm.forward``, op for op (bit-identical to it).

    ``weight * (x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)).to(x.dtype)``: the normalised
    activations are cast back to ``x.dtype`` *before* the weight multiply, whose result has the
    promoted dtype of ``weight`` and ``x`` (``x.dtype`` when they match).
    """
    _check_norm(x, weight)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's ``hidden_states = residual + hidden_states`` followed by the next RMSNorm.

    Returns ``(rms_norm_reference(residual + x, weight, eps), residual + x)``; the sum is computed
    (and rounded) in ``x.dtype`` like HF, and the norm reads the rounded sum.
    """
    _check_add_norm(x, residual, weight)
    new_residual = residual + x
    return rms_norm_reference(new_residual, weight, eps), new_residual


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [..., 2I]`` holding ``gate`` then ``up`` (HF's
    ``act_fn(gate_proj(x)) * up_proj(x)`` with ``hidden_act="silu"``, in the input dtype)."""
    _check_silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face ``apply_rotary_pos_emb`` with ``rotate_half`` (non-interleaved halves), op for
    op.  Same arguments and layouts as :func:`rope`; returns contiguous tensors like HF."""
    _check_rope(q, k, cos, sin, unsqueeze_dim)
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------- argument checks


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"weight must have shape [N] with N = x.shape[-1]; got x {tuple(x.shape)} and "
            f"weight {tuple(weight.shape)}"
        )


def _check_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    _check_norm(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual must match x in shape and dtype; got x {tuple(x.shape)} {x.dtype} and "
            f"residual {tuple(residual.shape)} {residual.dtype}"
        )


def _check_silu_mul(gate_up: torch.Tensor) -> None:
    _check_float("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must be [..., 2I] (gate then up), got shape {tuple(gate_up.shape)}"
        )


def _check_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
) -> None:
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"unsqueeze_dim must be 1 (q/k are [B, H, T, D]) or 2 (q/k are [B, T, H, D]), "
            f"got {unsqueeze_dim}"
        )
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-d, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    t_dim = 3 - unsqueeze_dim  # the token axis: 2 for [B, H, T, D], 1 for [B, T, H, D]
    B, T, D = q.shape[0], q.shape[t_dim], q.shape[3]
    if (k.shape[0], k.shape[t_dim], k.shape[3]) != (B, T, D):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, tokens or head dim "
            f"(unsqueeze_dim={unsqueeze_dim})"
        )
    if D % 2:
        raise ValueError(f"rotate_half needs an even head dim, got D={D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[1:] != (T, D) or t.shape[0] not in (1, B):
            raise ValueError(
                f"{name} must be [B, T, D] = [{B}, {T}, {D}] (or [1, T, D]), got {tuple(t.shape)}"
            )
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_float(name, t)
    dtypes = {q.dtype, k.dtype, cos.dtype, sin.dtype}
    if len(dtypes) != 1:
        raise TypeError(
            f"q, k, cos and sin must share one dtype, got {q.dtype}, {k.dtype}, {cos.dtype}, "
            f"{sin.dtype}"
        )


def _check_triton_call(fn: str, *tensors: torch.Tensor) -> None:
    """Device checks shared by the Triton entry points."""
    if triton is None:
        raise RuntimeError(f"{fn} needs triton; use {fn}_reference")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{fn}: all inputs must be on one device, got {sorted(map(str, devices))}")
    device = tensors[0].device
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"{fn} got {device} tensors but Triton is compiling for GPU; use {fn}_reference, or "
            "set TRITON_INTERPRET=1 before importing this module"
        )


def interpreted() -> bool:
    """Whether the Triton kernels of ``operators/triton`` run under Triton's interpreter: Triton
    chose compile vs. interpret when they were decorated (at import), all alike."""
    return triton is not None and not isinstance(_rms_norm_kernel, triton.runtime.JITFunction)


def _check_kv_caches(
    fn: str, k: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> None:
    """K and V caches ``[S, H, L, D]`` of one layout with a contiguous last dim, whose heads and
    head dim match ``k`` (``[B, H, D]`` or ``[B, H, 1, D]``)."""
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"{fn}: K and V caches must have one layout, got {tuple(k_cache.shape)} and "
            f"{tuple(v_cache.shape)}"
        )
    if (
        k_cache.stride(-1) != 1
        or k.shape[-1] != k_cache.shape[-1]
        or k.shape[1] != k_cache.shape[1]
    ):
        raise ValueError(
            f"{fn}: heads or head dims differ or the cache's last dim is not contiguous "
            f"(k {tuple(k.shape)}, cache {tuple(k_cache.shape)})"
        )


def _check_unit_stride(fn: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{fn}: the last dim of {name} must be contiguous (stride 1), got strides "
                f"{t.stride()}; pass {name}.contiguous()"
            )


def _check_head_norms(
    fn: str, heads: torch.Tensor, head_norms: tuple[torch.Tensor, torch.Tensor, float] | None
) -> None:
    """Per-head norm weights fit the heads ([..., D]) and are contiguous in their dtype."""
    if head_norms is None:
        return
    for weight in head_norms[:2]:
        _check_norm(heads, weight)
        if weight.dtype != heads.dtype or weight.stride(-1) != 1:
            raise TypeError(
                f"{fn}: head norm weights must be contiguous {heads.dtype}, got "
                f"{weight.dtype} with strides {weight.stride()}"
            )


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rows(fn: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, N]``: a view for any layout whose leading dims flatten (e.g. contiguous
    or a slice of rows); otherwise a copy."""
    _check_unit_stride(fn, x=x)
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        y_ptr,
        res_out_ptr,
        n_cols,
        eps,
        stride_x,
        stride_res,
        stride_y,
        stride_res_out,
        BLOCK: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            # HF: hidden_states = residual + hidden_states, materialised in the input dtype.
            r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
        h = x.to(tl.float32)
        variance = tl.sum(h * h, axis=0) / n_cols
        normed = (h * tl.math.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        y = w.to(tl.float32) * normed.to(tl.float32)  # exact for bf16/fp16 operands
        tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(
        in_ptr,
        out_ptr,
        n_cols,
        stride_in,
        stride_out,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        base = in_ptr + row * stride_in
        g = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(base + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        # torch's silu: x / (1 + exp(-x)) in fp32, rounded to the input dtype; then * up.
        act = (g / (1.0 + tl.exp(-g))).to(in_ptr.dtype.element_ty).to(tl.float32)
        out = (act * u).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + offs, out, mask=mask)

    @triton.jit
    def _rotate_pair(xa, ca, xb, sb, DTYPE: tl.constexpr):
        # round(round(xa * ca) + round(xb * sb)) in DTYPE, all operands fp32: HF's
        # (x * cos) + (rotate_half(x) * sin) with each product and the sum materialised in the
        # input dtype.  The round trips are no-ops for fp32.
        p = (xa * ca).to(DTYPE).to(tl.float32)
        r = (xb * sb).to(DTYPE).to(tl.float32)
        return (p + r).to(DTYPE)

    @triton.jit
    def _rope_values(
        src_row,
        heads,
        head_mask,
        offs,
        d_mask,
        c1,
        c2,
        s1,
        s2,
        stride_h,
        norm_ptr,
        eps,
        DTYPE: tl.constexpr,
        HALF: tl.constexpr,
        NORM: tl.constexpr,
    ):
        # The two rotated halves [heads, HALF] (in DTYPE) of the heads of one token; src_row
        # points at its head 0. With NORM, each head is first RMS-normalised over its D values
        # with the weight at norm_ptr (Qwen3's per-head q/k norm; HF's rounding points, as
        # `rms_norm`). Masked-off lanes are 0.
        mask = head_mask[:, None] & d_mask[None, :]
        src = src_row + heads[:, None] * stride_h + offs[None, :]
        # Negate in fp32 (exact), not in the storage dtype.
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            variance = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
            rstd = tl.math.rsqrt(variance + eps)[:, None]
            w1 = tl.load(norm_ptr + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(norm_ptr + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            x1 = (w1 * (x1 * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
            x2 = (w2 * (x2 * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
        # rotate_half(x) = cat(-x2, x1): first half x1*cos1 - x2*sin1, second x2*cos2 + x1*sin2.
        o1 = _rotate_pair(x1, c1[None, :], -x2, s1[None, :], DTYPE)
        o2 = _rotate_pair(x2, c2[None, :], x1, s2[None, :], DTYPE)
        return o1, o2

    @triton.jit
    def _rope_heads(
        src_row,
        dst_row,
        heads,
        head_mask,
        offs,
        d_mask,
        c1,
        c2,
        s1,
        s2,
        stride_h,
        stride_oh,
        norm_ptr,
        eps,
        HALF: tl.constexpr,
        NORM: tl.constexpr,
    ):
        # `_rope_values` stored at dst_row (head 0 of the token in the destination).
        o1, o2 = _rope_values(
            src_row,
            heads,
            head_mask,
            offs,
            d_mask,
            c1,
            c2,
            s1,
            s2,
            stride_h,
            norm_ptr,
            eps,
            dst_row.dtype.element_ty,
            HALF,
            NORM,
        )
        mask = head_mask[:, None] & d_mask[None, :]
        dst = dst_row + heads[:, None] * stride_oh + offs[None, :]
        tl.store(dst, o1, mask=mask)
        tl.store(dst + HALF, o2, mask=mask)

    @triton.jit
    def _write_kv_kernel(
        k_ptr,
        v_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slots_ptr,
        positions_ptr,
        stride_kb,
        stride_kh,
        stride_vb,
        stride_vh,
        stride_cs,
        stride_ch,
        stride_cl,
        stride_pos,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        slot = tl.load(slots_ptr + row)
        position = tl.load(positions_ptr + row * stride_pos)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        k = tl.load(k_ptr + row * stride_kb + head * stride_kh + offs, mask=mask)
        v = tl.load(v_ptr + row * stride_vb + head * stride_vh + offs, mask=mask)
        dst = slot * stride_cs + head * stride_ch + position * stride_cl + offs
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        qo_ptr,
        ko_ptr,
        vo_ptr,
        slots_ptr,
        positions_ptr,
        q_norm_ptr,
        k_norm_ptr,
        eps,
        n_tokens,
        stride_qb,
        stride_qt,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vh,
        stride_cb,
        stride_ct,
        stride_sb,
        stride_st,
        stride_qob,
        stride_qot,
        stride_qoh,
        stride_kob,
        stride_kot,
        stride_koh,
        stride_cache_s,
        stride_cache_h,
        stride_cache_l,
        stride_pos,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        WRITE_KV: tl.constexpr,
        NORM: tl.constexpr,
    ):
        # Program (token, head block): heads [0, HQ) of the block range are q heads, heads
        # [HQ, HQ + HKV) are k heads, so one launch covers both tensors.  With WRITE_KV (decode,
        # one token per row) the rotated k goes straight into the K cache at the row's slot and
        # position, and heads [HQ + HKV, HQ + 2 HKV) copy v into the V cache.
        token = tl.program_id(0).to(tl.int64)
        b = token // n_tokens
        t = token % n_tokens
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs = tl.arange(0, BLOCK_HALF)
        d_mask = offs < HALF

        cos_row = cos_ptr + b * stride_cb + t * stride_ct + offs
        sin_row = sin_ptr + b * stride_sb + t * stride_st + offs
        c1 = tl.load(cos_row, mask=d_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + HALF, mask=d_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row, mask=d_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + HALF, mask=d_mask, other=0.0).to(tl.float32)

        is_q = heads < HQ
        q_row = q_ptr + b * stride_qb + t * stride_qt
        qo_row = qo_ptr + b * stride_qob + t * stride_qot
        q_heads = tl.where(is_q, heads, 0)
        _rope_heads(
            q_row,
            qo_row,
            q_heads,
            is_q,
            offs,
            d_mask,
            c1,
            c2,
            s1,
            s2,
            stride_qh,
            stride_qoh,
            q_norm_ptr,
            eps,
            HALF,
            NORM,
        )
        is_k = (heads >= HQ) & (heads < HQ + HKV)
        k_row = k_ptr + b * stride_kb + t * stride_kt
        if WRITE_KV:
            slot = tl.load(slots_ptr + b).to(tl.int64)
            position = tl.load(positions_ptr + b * stride_pos).to(tl.int64)
            cache_row = slot * stride_cache_s + position * stride_cache_l
            ko_row = ko_ptr + cache_row
            stride_out_h = stride_cache_h
        else:
            ko_row = ko_ptr + b * stride_kob + t * stride_kot
            stride_out_h = stride_koh
        k_heads = tl.where(is_k, heads - HQ, 0)
        _rope_heads(
            k_row,
            ko_row,
            k_heads,
            is_k,
            offs,
            d_mask,
            c1,
            c2,
            s1,
            s2,
            stride_kh,
            stride_out_h,
            k_norm_ptr,
            eps,
            HALF,
            NORM,
        )
        if WRITE_KV:
            is_v = (heads >= HQ + HKV) & (heads < HQ + 2 * HKV)
            v_heads = tl.where(is_v, heads - HQ - HKV, 0)
            mask = is_v[:, None] & d_mask[None, :]
            src = v_ptr + b * stride_vb + v_heads[:, None] * stride_vh + offs[None, :]
            dst = vo_ptr + cache_row + v_heads[:, None] * stride_cache_h + offs[None, :]
            tl.store(dst, tl.load(src, mask=mask), mask=mask)
            tl.store(dst + HALF, tl.load(src + HALF, mask=mask), mask=mask)


# ---------------------------------------------------------------- Triton entry points


def _norm_launch(
    fn: str,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    tensors = (x, weight) if residual is None else (x, residual, weight)
    _check_triton_call(fn, *tensors)
    n = x.shape[-1]
    if not 1 <= n <= MAX_NORM_DIM:
        raise ValueError(f"{fn} supports last dims 1..{MAX_NORM_DIM}, got {n}")
    _check_unit_stride(fn, weight=weight)
    x2 = _rows(fn, x)
    res2 = _rows(fn, residual) if residual is not None else x2
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = (
        torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    )
    rows = x2.shape[0]
    if rows == 0:
        return y, res_out
    y2 = y.view(-1, n)
    ro2 = res_out.view(-1, n) if res_out is not None else y2
    block = max(16, _next_pow2(n))
    _rms_norm_kernel[(rows,)](
        x2,
        res2,
        weight,
        y2,
        ro2,
        n,
        float(eps),
        x2.stride(0),
        res2.stride(0),
        y2.stride(0),
        ro2.stride(0),
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        num_warps=min(16, max(1, block // 256)),
    )
    return y, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in one kernel, with Hugging Face ``LlamaRMSNorm`` numerics.

    Args:
        x: ``[..., N]`` activations (fp32/bf16/fp16), ``1 <= N <= MAX_NORM_DIM`` (8192), last dim
            contiguous.  Leading dims that flatten to rows without a copy are read in place.
        weight: ``[N]`` scale, contiguous (normally of ``x.dtype``).
        eps: added to the mean square, as HF's ``variance_epsilon``.

    Returns:
        A new contiguous ``[..., N]`` tensor of dtype ``promote_types(weight.dtype, x.dtype)``:
        ``weight * (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)``.

    One program per row, grid ``(rows,)``; CUDA-graph safe.  Same contract as
    :func:`rms_norm_reference` (within a last-bit difference, see the module docstring).
    """
    _check_norm(x, weight)
    y, _ = _norm_launch("rms_norm", x, None, weight, eps)
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm, in one kernel that reads ``x`` and ``residual`` once.

    Args:
        x: ``[..., N]`` new activations (e.g. the attention output), last dim contiguous.
        residual: the residual stream, same shape and dtype as ``x``.
        weight: ``[N]`` weight of the norm that follows the add.
        eps: the norm's epsilon.

    Returns:
        ``(y, new_residual)``: ``new_residual = residual + x`` rounded to ``x.dtype`` (HF's
        ``hidden_states = residual + hidden_states``) and ``y = rms_norm(new_residual)``; both
        new contiguous tensors.  Same contract as :func:`add_rms_norm_reference`; the residual is
        bit-exact with torch on GPU.
    """
    _check_add_norm(x, residual, weight)
    y, new_residual = _norm_launch("add_rms_norm", x, residual, weight, eps)
    assert new_residual is not None
    return y, new_residual


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one kernel, for ``gate_up = [..., 2I]`` with ``gate`` first.

    Args:
        gate_up: the fused gate/up projection output (``operators.mlp.FusedGatedMLP``'s
            ``F.linear(x, gate_up_weight)``), fp32/bf16/fp16, last dim contiguous.

    Returns:
        A new contiguous ``[..., I]`` tensor of ``gate_up.dtype``.  ``silu`` is computed in fp32
        and rounded to the input dtype before the multiply, like ``F.silu(gate) * up``; results
        are within one rounding of :func:`silu_mul_reference`.

    Grid ``(rows, cdiv(I, BLOCK))`` with ``BLOCK <= 2048``; CUDA-graph safe.
    """
    _check_silu_mul(gate_up)
    _check_triton_call("silu_mul", gate_up)
    inter = gate_up.shape[-1] // 2
    src = _rows("silu_mul", gate_up)
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    rows = src.shape[0]
    if rows == 0 or inter == 0:
        return out
    dst = out.view(-1, inter)
    block = min(2048, max(16, _next_pow2(inter)))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
        src,
        dst,
        inter,
        src.stride(0),
        dst.stride(0),
        BLOCK=block,
        num_warps=min(8, max(1, block // 256)),
    )
    return out


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write one token per row into a static cache: ``cache[slots[b], :, positions[b]] = x[b]``.

    ``k``/``v``: [B, H, D]; caches: [S, H, L, D]; ``slots``/``positions``: int [B].
    """
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """:func:`write_kv_reference` as one launch for K and V (advanced-index assignment costs
    several kernels per tensor). Grid ``(B, H)``; CUDA-graph safe."""
    _check_triton_call("write_kv", k, v, k_cache, v_cache)
    _check_unit_stride("write_kv", k=k, v=v)
    _check_kv_caches("write_kv", k, k_cache, v_cache)
    batch, heads, dim = k.shape
    if batch == 0:
        return
    _write_kv_kernel[(batch, heads)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        positions,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        positions.stride(0),
        D=dim,
        BLOCK_D=_next_pow2(dim),
    )


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k in one kernel launch (HF ``apply_rotary_pos_emb``).

    Drop-in for Hugging Face's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` with
    ``rotate_half`` (the two halves of the head dim rotate together; GPT-J style interleaved
    pairs are not supported).

    Args:
        q: ``[B, Hq, T, D]`` when ``unsqueeze_dim == 1`` (HF's layout, typically the transposed
            view of a ``[B, T, Hq, D]`` buffer) or ``[B, T, Hq, D]`` when ``unsqueeze_dim == 2``.
            Any strides, except that the last dim must be contiguous: the q/k views of a fused
            qkv projection are read in place, transposed or not.
        k: ``[B, Hkv, T, D]`` / ``[B, T, Hkv, D]`` likewise (``Hkv`` may differ from ``Hq``).
        cos, sin: ``[B, T, D]`` (or ``[1, T, D]``, broadcast over the batch), HF's
            ``position_embeddings``, last dim contiguous.
        unsqueeze_dim: 1 or 2, as in HF: the axis of q/k that holds the heads.

    ``q``, ``k``, ``cos`` and ``sin`` must share one dtype (HF casts cos/sin to the activation
    dtype) and ``D`` must be even, ``D <= MAX_ROPE_HEAD_DIM`` (512).

    Returns:
        ``(q_embed, k_embed)`` with the shapes of ``q`` and ``k``, in new tensors whose memory is
        ``[B, T, H, D]``-contiguous; for ``unsqueeze_dim == 1`` they are therefore transposed
        views (``.transpose(1, 2)`` of a contiguous ``[B, T, H, D]`` tensor), so
        ``q_embed.transpose(1, 2).reshape(B, T, H * D)`` is free.  Values are bit-identical to
        HF on GPU (round-to-nearest casts, no FMA contraction).

    Grid ``(B * T, cdiv(Hq + Hkv, BLOCK_H))``: each program loads one token's cos/sin once and
    rotates a block of its q and k heads.  CUDA-graph safe.
    """
    _check_rope(q, k, cos, sin, unsqueeze_dim)
    _check_triton_call("rope", q, k, cos, sin)
    _check_unit_stride("rope", q=q, k=k, cos=cos, sin=sin)
    D = q.shape[3]
    if D > MAX_ROPE_HEAD_DIM:
        raise ValueError(f"rope supports head dims up to {MAX_ROPE_HEAD_DIM}, got D={D}")
    if unsqueeze_dim == 1:  # work on [B, T, H, D] views of everything
        q_bthd, k_bthd = q.transpose(1, 2), k.transpose(1, 2)
    else:
        q_bthd, k_bthd = q, k
    B, T, Hq, _ = q_bthd.shape
    Hkv = k_bthd.shape[2]
    q_out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, T, Hkv, D), dtype=k.dtype, device=k.device)
    if unsqueeze_dim == 1:
        q_ret, k_ret = q_out.transpose(1, 2), k_out.transpose(1, 2)
    else:
        q_ret, k_ret = q_out, k_out
    _rope_launch(q_bthd, k_bthd, cos, sin, q_out, k_out)
    return q_ret, k_ret


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    *,
    head_norms: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """A decode step's :func:`rope` and :func:`write_kv` in one launch: returns the rotated q
    and writes the rotated k and v into the caches (``cache[slots[b], :, positions[b]]``).
    ``head_norms = (q_weight, k_weight, eps)`` first RMS-normalises every q and k head over its
    ``D`` values (Qwen3's per-head norms, :func:`rms_norm_reference` numerics; weights ``[D]``
    of q's dtype), saving those two launches as well.

    ``q`` ``[B, Hq, 1, D]``, ``k``/``v`` ``[B, Hkv, 1, D]`` (HF's layout, e.g. transposed views
    of a fused qkv projection), ``cos``/``sin`` ``[B, 1, D]`` or ``[1, 1, D]``, caches
    ``[S, Hkv, L, D]``, ``slots``/``positions`` int ``[B]``. The values written and returned equal
    ``rope`` followed by ``write_kv``. Grid ``(B, cdiv(Hq + 2 Hkv, BLOCK_H))``; CUDA-graph safe.
    """
    _check_rope(q, k, cos, sin, 1)
    _check_triton_call("rope_write_kv", q, k, v, cos, sin, k_cache, v_cache)
    _check_unit_stride("rope_write_kv", q=q, k=k, v=v, cos=cos, sin=sin)
    B, Hq, T, D = q.shape
    if T != 1 or v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(
            f"rope_write_kv takes one token per row and v shaped like k; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if D > MAX_ROPE_HEAD_DIM:
        raise ValueError(f"rope_write_kv supports head dims up to {MAX_ROPE_HEAD_DIM}, got D={D}")
    _check_kv_caches("rope_write_kv", k, k_cache, v_cache)
    if k_cache.dtype != k.dtype:
        raise ValueError(f"rope_write_kv: the caches are {k_cache.dtype}, k is {k.dtype}")
    _check_head_norms("rope_write_kv", q[:, 0, 0], head_norms)
    q_out = torch.empty((B, 1, Hq, D), dtype=q.dtype, device=q.device)
    cache = (v.transpose(1, 2), v_cache, slots, positions)
    _rope_launch(
        q.transpose(1, 2),
        k.transpose(1, 2),
        cos,
        sin,
        q_out,
        k_cache,
        cache=cache,
        head_norms=head_norms,
    )
    return q_out.transpose(1, 2)


def _rope_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    *,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    head_norms: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> None:
    """Launch `_rope_kernel` on [B, T, H, D] views. With `cache = (v, v_cache, slots,
    positions)`, `k_out` is the K cache and v is copied into `v_cache`; with `head_norms`, q and
    k heads are RMS-normalised first."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    heads = Hq + Hkv * (2 if cache is not None else 1)
    if B * T == 0 or D == 0 or heads == 0:
        return
    cos_b, sin_b = cos.expand(B, T, D), sin.expand(B, T, D)  # stride 0 over a broadcast batch
    if cache is None:
        v, v_out, slots, positions = q, q_out, q, q  # unused pointers
        k_strides, cache_strides, v_strides, stride_pos = k_out.stride()[:3], (0, 0, 0), (0, 0), 0
    else:
        v, v_out, slots, positions = cache
        k_strides = (0, 0, 0)
        cache_strides = (k_out.stride(0), k_out.stride(1), k_out.stride(2))
        v_strides = (v.stride(0), v.stride(2))
        stride_pos = positions.stride(0)
    half = D // 2
    block_half = max(16, _next_pow2(half))
    block_h = min(_next_pow2(heads), max(1, 1024 // block_half))
    _rope_kernel[(B * T, triton.cdiv(heads, block_h))](
        q,
        k,
        v,
        cos_b,
        sin_b,
        q_out,
        k_out,
        v_out,
        slots,
        positions,
        *(head_norms if head_norms is not None else (q, q, 0.0)),  # q: unused pointers
        T,
        *q.stride()[:3],
        *k.stride()[:3],
        *v_strides,
        *cos_b.stride()[:2],
        *sin_b.stride()[:2],
        *q_out.stride()[:3],
        *k_strides,
        *cache_strides,
        stride_pos,
        HQ=Hq,
        HKV=Hkv,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        WRITE_KV=cache is not None,
        NORM=head_norms is not None,
        num_warps=4 if block_h * block_half >= 512 else 1,
        # No fused multiply-add: HF rounds each product before the sum (matters for fp32).
        enable_fp_fusion=False,
    )
