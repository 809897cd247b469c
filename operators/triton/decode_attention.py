"""Flash-decoding attention over a static (fixed-size) KV cache.

Why this exists
---------------
During decode every sequence in the batch contributes exactly one new query token, and its keys
and values live in a pre-allocated cache ``[S, Hkv, L, D]`` whose length ``L`` is the *maximum*
context, not the current one.  Two constraints follow:

* **Read only the valid prefix.**  Row ``b`` may attend to positions ``[0, seq_lens[b])`` of its
  slot only.  Everything past that is stale or uninitialised (it may even hold NaN), so it must
  neither be read into the softmax nor cost memory bandwidth: decode is bandwidth bound, and
  streaming the whole ``L`` for a short sequence would waste most of the step.
* **Be CUDA-graph capturable.**  The engine captures the decode step once and replays it with new
  ``seq_lens``/``slots`` in place.  So the launch may not read tensor values on the host (no
  ``.item()``, no synchronisation, no Python branching on data) and the grid may depend only on
  shapes (``B``, ``Hkv``, ``L``), never on ``seq_lens``.

Design (split-K "flash-decoding")
---------------------------------
The cache length is cut into fixed splits of ``split_len`` positions and the first kernel runs on
the grid ``(B, Hkv, cdiv(L, split_len))``.  A program reads ``seq_lens[b]`` on the device and
returns immediately when its split starts at or past it, so the work done scales with the valid
length while the grid stays a pure function of shapes.  A live program loads each K/V tile once
for the whole GQA group of query heads that share the kv head (the group is padded to at least 16
rows so both products run through ``tl.dot``), runs an online softmax (base-2 exponentials, fp32
statistics and accumulator) over its split, and writes its partial row max, row sum and
unnormalised accumulator to an fp32 workspace.  The ``cdiv(seq_len, split_len)`` live splits of
each row are then merged (splits past that are never read, so the workspace needs no
initialisation) and the normalised output written: by the last live split of each (row, kv head)
to finish, when the caller keeps zeroed counters for it (the engine's cache does: one launch per
layer), otherwise by a second kernel on the grid ``(B, Hkv)``.  When ``L`` fits in a single split
the first kernel normalises and writes the output itself and no merge is needed.

With ``new_kv`` the same launch also does the step's rotary embedding and cache write (what
``rope_write_kv`` does in a launch of its own otherwise): every live program rotates its group's
query heads itself, keeping them as two halves whose products with the two halves of each K tile
add up to ``q . k``; the program whose split holds the new position rotates the new key, writes
it and the new value there, and syncs its threads before its loop reads that position. No other
program reads it, so nothing waits across programs.

:func:`decode_attention_reference` is the plain-torch equivalent: the CPU path of the engine and
the oracle of the tests.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: the torch reference must stay importable without it (e.g. macOS).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

from operators.triton.fused import (
    _check_head_norms,
    _check_rope,
    _check_triton_call,
    _check_unit_stride,
    interpreted,
)

__all__ = ["decode_attention", "decode_attention_reference"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_len: int | None = None,
) -> torch.Tensor:
    """Single-token decode attention over a static KV cache, in plain torch.

    Args:
        q: ``[B, Hq, D]`` query of the one new token of each row (fp32/bf16/fp16).
        k_cache: ``[S, Hkv, L, D]`` key cache.
        v_cache: ``[S, Hkv, L, D]`` value cache.
        slots: ``[B]`` integer tensor, the cache slot that row ``b`` reads.
        seq_lens: ``[B]`` int32/int64 tensor, the number of valid positions (``>= 1``) of that
            slot.  Positions ``>= seq_lens[b]`` never influence the result, even if they hold NaN.
        scale: softmax scale applied to ``q . k`` (usually ``D ** -0.5``).
        max_len: a bound on ``seq_lens`` known without reading it (the engine's compiled CPU
            decode passes the longest row's length as a symbolic size): only that many cache
            positions are read.

    Query head ``h`` uses kv head ``h // (Hq // Hkv)`` (grouped-query attention).  The math runs
    in fp32 and the result is returned as ``[B, Hq, D]`` in ``q``'s dtype.

    Without ``max_len``, off CUDA the gathered cache is trimmed to ``max(seq_lens)`` positions,
    which reads that value on the host; on CUDA nothing is read on the host (the full ``L`` is
    gathered and masked), so the function stays capturable there too, just slower than
    :func:`decode_attention`.
    """
    _check_inputs(q, k_cache, v_cache, slots, seq_lens)
    B, Hq, D = q.shape
    _, Hkv, L, _ = k_cache.shape
    group = Hq // Hkv
    if B == 0:
        return q.new_empty((0, Hq, D))

    lens = seq_lens.to(device=q.device, dtype=torch.long)
    if max_len is not None:
        k_cache, v_cache = k_cache[:, :, :max_len], v_cache[:, :, :max_len]
    elif q.device.type != "cuda":
        # A host read is harmless off-GPU and saves gathering the unused tail of the cache.
        n = max(1, int(lens.max()))
        k_cache, v_cache = k_cache[:, :, :n], v_cache[:, :, :n]
    L = k_cache.shape[2]
    slot_idx = slots.to(device=q.device, dtype=torch.long)
    keys = k_cache[slot_idx]  # [B, Hkv, L, D]
    values = v_cache[slot_idx]

    valid = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [B, L]
    valid_kv = valid[:, None, :, None]
    # torch.where (not multiplication) so NaN garbage in the tail cannot leak into the result.
    keys = torch.where(valid_kv, keys.float(), 0.0)
    values = torch.where(valid_kv, values.float(), 0.0)

    qf = q.float().reshape(B, Hkv, group, D)
    scores = torch.matmul(qf, keys.transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values)  # [B, Hkv, G, D]
    return out.reshape(B, Hq, D).to(q.dtype)


def _check_inputs(q, k_cache, v_cache, slots, seq_lens) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [S, Hkv, L, D] with the same shape, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    B, Hq, D = q.shape
    _, Hkv, _, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has D={D}, the cache has D={Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a positive multiple of Hkv={Hkv}")
    if slots.shape != (B,) or seq_lens.shape != (B,):
        raise ValueError(
            f"slots and seq_lens must be [B]=[{B}], got {tuple(slots.shape)} and "
            f"{tuple(seq_lens.shape)}"
        )
    if slots.dtype.is_floating_point or seq_lens.dtype.is_floating_point:
        raise TypeError("slots and seq_lens must be integer tensors")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _default_split_len(cache_len: int) -> int:
    """Split length chosen from the cache length alone (never from ``seq_lens``).

    Aims at ~16 splits per (row, kv head) for parallelism at small batch, clamped to
    ``[64, 256]`` positions so a split streams enough K/V to amortise the merge; tiny caches get
    a single split of ``next_pow2(L)`` (>= 16) positions.
    """
    split = min(256, max(64, _next_pow2(triton.cdiv(cache_len, 16))))
    return min(split, max(16, _next_pow2(cache_len)))


if triton is not None:
    from operators.triton.fused import _rope_values

    @triton.jit
    def _mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST is only set under TRITON_INTERPRET for bf16: the interpreter stores bf16 as raw
        # uint16 and its tl.dot multiplies those integers, so it has to see fp32 operands.  The
        # operands are already rounded to bf16, so the result matches the GPU's bf16 MMA.
        if UPCAST:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            c = tl.dot(a, b, input_precision=DOT_PRECISION)
        return c

    @triton.jit
    def _merge_splits(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        b,
        kvh,
        offs_d,
        d_mask,
        n_live,
        stride_mb,
        stride_mh,
        stride_ms,
        stride_ab,
        stride_ah,
        stride_as,
        stride_ad,
        stride_ob,
        stride_oh,
        stride_od,
        GROUP: tl.constexpr,
        MERGE_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
    ):
        # Merge the partial (max, sum, accumulator) of the n_live splits of the GROUP query heads
        # of kv head `kvh` and write the normalised output; splits past n_live were never
        # written and are not read. BLOCK_S splits are loaded at once, so a long context's
        # dozens of splits cost a few dependent memory round trips, not one each. Padded heads
        # (g_mask false) stay finite and are never stored.
        offs_g = tl.arange(0, MERGE_G)
        g_mask = offs_g < GROUP
        heads = kvh * GROUP + offs_g
        offs_s = tl.arange(0, BLOCK_S)
        row = b.to(tl.int64) * stride_mb + heads * stride_mh
        a_row = acc_ptr + b.to(tl.int64) * stride_ab + heads * stride_ah
        m_run = tl.where(g_mask, float("-inf"), 0.0)
        l_run = tl.zeros([MERGE_G], tl.float32)
        acc = tl.zeros([MERGE_G, BLOCK_D], tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):  # static bound; split 0 is always live
            splits = s0 + offs_s
            live = g_mask[:, None] & (splits < n_live)[None, :]
            at = row[:, None] + splits[None, :] * stride_ms
            m = tl.load(m_ptr + at, mask=live, other=float("-inf"))
            m = tl.where(g_mask[:, None], m, 0.0)
            lsum = tl.load(l_ptr + at, mask=live, other=0.0)
            part = tl.load(
                a_row[:, None, None]
                + splits[None, :, None] * stride_as
                + offs_d[None, None, :] * stride_ad,
                mask=live[:, :, None] & d_mask[None, None, :],
                other=0.0,
            )
            m_new = tl.maximum(m_run, tl.max(m, axis=1))
            alpha = tl.exp2(m_run - m_new)
            w = tl.exp2(m - m_new[:, None])  # 0 for dead splits
            l_run = l_run * alpha + tl.sum(w * lsum, axis=1)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part, axis=1)
            m_run = m_new
        out = acc / tl.where(g_mask, l_run, 1.0)[:, None]
        o_ptrs = (
            out_ptr
            + b.to(tl.int64) * stride_ob
            + heads[:, None] * stride_oh
            + offs_d[None, :] * stride_od
        )
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _decode_split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        slots_ptr,
        seq_lens_ptr,
        out_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        qk_scale,
        cache_len,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_ks,
        stride_kh,
        stride_kl,
        stride_kd,
        stride_vs,
        stride_vh,
        stride_vl,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_od,
        stride_mb,
        stride_mh,
        stride_ms,
        stride_ab,
        stride_ah,
        stride_as,
        stride_ad,
        counter_ptr,
        stride_cnt,
        k_new_ptr,
        v_new_ptr,
        cos_ptr,
        sin_ptr,
        q_norm_ptr,
        k_norm_ptr,
        eps,
        stride_knb,
        stride_knh,
        stride_vnb,
        stride_vnh,
        stride_cb,
        stride_sb,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT_LEN: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr,
        FUSED_COMBINE: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        MERGE_G: tl.constexpr,
        BLOCK_S: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        ROPE: tl.constexpr,
        NORM: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)

        seq_len = tl.minimum(tl.load(seq_lens_ptr + b).to(tl.int32), cache_len)
        split_start = split * SPLIT_LEN
        if split_start < seq_len:  # otherwise this split holds no valid position: do nothing
            split_end = tl.minimum(split_start + SPLIT_LEN, seq_len)
            slot = tl.load(slots_ptr + b).to(tl.int64)

            offs_g = tl.arange(0, BLOCK_G)
            offs_d = tl.arange(0, BLOCK_D)
            offs_n = tl.arange(0, BLOCK_N)
            g_mask = offs_g < GROUP
            d_mask = offs_d < HEAD_DIM
            heads = kvh * GROUP + offs_g

            k_base = k_ptr + slot * stride_ks + kvh.to(tl.int64) * stride_kh
            v_base = v_ptr + slot * stride_vs + kvh.to(tl.int64) * stride_vh
            if ROPE:  # q and the new k/v arrive unrotated; q kept as two halves
                offs_h = tl.arange(0, BLOCK_HALF)
                h_mask = offs_h < HALF
                cos_row = cos_ptr + b.to(tl.int64) * stride_cb + offs_h
                sin_row = sin_ptr + b.to(tl.int64) * stride_sb + offs_h
                c1 = tl.load(cos_row, mask=h_mask, other=0.0).to(tl.float32)
                c2 = tl.load(cos_row + HALF, mask=h_mask, other=0.0).to(tl.float32)
                s1 = tl.load(sin_row, mask=h_mask, other=0.0).to(tl.float32)
                s2 = tl.load(sin_row + HALF, mask=h_mask, other=0.0).to(tl.float32)
                q_row = q_ptr + b.to(tl.int64) * stride_qb
                q1, q2 = _rope_values(
                    q_row, heads, g_mask, offs_h, h_mask, c1, c2, s1, s2, stride_qh,
                    q_norm_ptr, eps, q_ptr.dtype.element_ty, HALF, NORM,
                )  # fmt: skip
                q1, q2 = q1.to(k_ptr.dtype.element_ty), q2.to(k_ptr.dtype.element_ty)
                if split == (seq_len - 1) // SPLIT_LEN:
                    # this split holds the new position: rotate the new key, write it and the
                    # new value there, and sync the threads before the loop reads it (no other
                    # split reads that position)
                    new_pos = (seq_len - 1).to(tl.int64)
                    head = tl.zeros([1], tl.int32)
                    k_row = k_new_ptr + b.to(tl.int64) * stride_knb + kvh.to(tl.int64) * stride_knh
                    k1, k2 = _rope_values(
                        k_row, head, head == 0, offs_h, h_mask, c1, c2, s1, s2, 0,
                        k_norm_ptr, eps, k_ptr.dtype.element_ty, HALF, NORM,
                    )  # fmt: skip
                    k_dst = k_base + new_pos * stride_kl + offs_h[None, :] * stride_kd
                    tl.store(k_dst, k1, mask=h_mask[None, :])
                    tl.store(k_dst + HALF * stride_kd, k2, mask=h_mask[None, :])
                    v_row = v_new_ptr + b.to(tl.int64) * stride_vnb + kvh.to(tl.int64) * stride_vnh
                    value = tl.load(v_row + offs_d, mask=d_mask)
                    tl.store(v_base + new_pos * stride_vl + offs_d * stride_vd, value, mask=d_mask)
                    tl.debug_barrier()
            else:
                q_ptrs = (
                    q_ptr
                    + b.to(tl.int64) * stride_qb
                    + heads[:, None] * stride_qh
                    + offs_d[None, :] * stride_qd
                )
                q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
                q = q.to(k_ptr.dtype.element_ty)

            m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            # Static trip count (a data-dependent bound would also work on GPU, but the Triton
            # interpreter cannot take a tensor as a range() bound).  Blocks at or past split_end
            # are fully masked: their loads touch no memory and they add exactly zero.  Block 0
            # always holds a valid position, so the running max is finite from then on.
            for i in range(SPLIT_LEN // BLOCK_N):
                pos = split_start + i * BLOCK_N + offs_n
                n_mask = pos < split_end
                kv_mask = n_mask[:, None] & d_mask[None, :]
                pos64 = pos.to(tl.int64)
                if ROPE:  # q . k as the sum over the two halves
                    k_ptrs = k_base + pos64[:, None] * stride_kl + offs_h[None, :] * stride_kd
                    half_mask = n_mask[:, None] & h_mask[None, :]
                    k1 = tl.load(k_ptrs, mask=half_mask, other=0.0)
                    k2 = tl.load(k_ptrs + HALF * stride_kd, mask=half_mask, other=0.0)
                    s = _mma(q1, tl.trans(k1), DOT_PRECISION, UPCAST_DOT)
                    s = (s + _mma(q2, tl.trans(k2), DOT_PRECISION, UPCAST_DOT)) * qk_scale
                else:
                    k = tl.load(
                        k_base + pos64[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                        mask=kv_mask,
                        other=0.0,
                    )
                    s = _mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
                s = tl.where(n_mask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(
                    v_base + pos64[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=kv_mask,
                    other=0.0,
                )
                acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
                m_i = m_new

            o_ptrs = (
                out_ptr
                + b.to(tl.int64) * stride_ob
                + heads[:, None] * stride_oh
                + offs_d[None, :] * stride_od
            )
            o_mask = g_mask[:, None] & d_mask[None, :]
            n_live = tl.cdiv(seq_len, SPLIT_LEN)
            # Merging needs no second launch when the caller keeps counters, and nothing at all
            # when this split is the only live one (SmolLM2 at short context): then it writes
            # the normalised output itself, like a single-split cache.
            if SINGLE_SPLIT or (FUSED_COMBINE and n_live == 1):
                tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
            else:
                row = b.to(tl.int64) * stride_mb + heads * stride_mh + split * stride_ms
                tl.store(m_ptr + row, m_i, mask=g_mask)
                tl.store(l_ptr + row, l_i, mask=g_mask)
                a_ptrs = (
                    acc_ptr
                    + b.to(tl.int64) * stride_ab
                    + heads[:, None] * stride_ah
                    + split * stride_as
                    + offs_d[None, :] * stride_ad
                )
                tl.store(a_ptrs, acc, mask=o_mask)
                if FUSED_COMBINE:
                    # The last live split of this (row, kv head) to finish merges them all. The
                    # barrier orders this program's partial stores before its arrival (release);
                    # the last arrival's acquire orders the other programs' partials before its
                    # loads (CUTLASS's semaphore pattern).
                    tl.debug_barrier()
                    counter = counter_ptr + b.to(tl.int64) * stride_cnt + kvh
                    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
                    if arrived == n_live - 1:
                        _merge_splits(
                            m_ptr,
                            l_ptr,
                            acc_ptr,
                            out_ptr,
                            b,
                            kvh,
                            offs_d,
                            d_mask,
                            n_live,
                            stride_mb,
                            stride_mh,
                            stride_ms,
                            stride_ab,
                            stride_ah,
                            stride_as,
                            stride_ad,
                            stride_ob,
                            stride_oh,
                            stride_od,
                            GROUP,
                            MERGE_G,
                            BLOCK_D,
                            BLOCK_S,
                            NUM_SPLITS,
                        )
                        tl.atomic_xchg(counter, 0, sem="relaxed")  # ready for the next call

    @triton.jit
    def _decode_combine_kernel(
        seq_lens_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        cache_len,
        stride_mb,
        stride_mh,
        stride_ms,
        stride_ab,
        stride_ah,
        stride_as,
        stride_ad,
        stride_ob,
        stride_oh,
        stride_od,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        MERGE_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        SPLIT_LEN: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
    ):
        # The second launch, when the caller keeps no split counters: one program per (row,
        # kv head) merges the splits of its group of query heads.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        seq_len = tl.minimum(tl.load(seq_lens_ptr + b).to(tl.int32), cache_len)
        offs_d = tl.arange(0, BLOCK_D)
        _merge_splits(
            m_ptr,
            l_ptr,
            acc_ptr,
            out_ptr,
            b,
            kvh,
            offs_d,
            offs_d < HEAD_DIM,
            tl.cdiv(seq_len, SPLIT_LEN),
            stride_mb,
            stride_mh,
            stride_ms,
            stride_ab,
            stride_ah,
            stride_as,
            stride_ad,
            stride_ob,
            stride_oh,
            stride_od,
            GROUP,
            MERGE_G,
            BLOCK_D,
            BLOCK_S,
            NUM_SPLITS,
        )


def _rope_operands(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    head_norms: tuple[torch.Tensor, torch.Tensor, float] | None,
) -> tuple:
    """Check `new_kv` / `head_norms` as `rope_write_kv` would; return the kernel's rotation
    arguments (tensors, eps, then strides; placeholders without `new_kv`)."""
    if new_kv is None:
        if head_norms is not None:
            raise ValueError("head_norms apply to the new token's rotation: pass new_kv too")
        return (q, q, q, q, q, q, 0.0, *(0,) * 6)
    k, v, cos, sin = new_kv
    B, Hq, D = q.shape
    if k.shape != (B, k_cache.shape[1], D) or v.shape != k.shape:
        raise ValueError(
            f"new_kv's k and v must be [B, Hkv, D] = {[B, k_cache.shape[1], D]}, got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    _check_rope(q[:, :, None], k[:, :, None], cos[:, None], sin[:, None], 1)
    if len({q.dtype, k.dtype, v.dtype, k_cache.dtype}) > 1:
        raise TypeError(
            f"q, the new k/v and the caches must share one dtype, got {q.dtype}, {k.dtype}, "
            f"{v.dtype} and {k_cache.dtype}"
        )
    _check_head_norms("decode_attention", q, head_norms)
    _check_unit_stride("decode_attention", q=q, k=k, v=v, cos=cos, sin=sin)
    _check_triton_call("decode_attention", k, v, cos, sin)
    norms = (q, q, 0.0) if head_norms is None else (*head_norms[:2], float(head_norms[2]))
    batch_strides = [t.stride(0) if t.shape[0] > 1 else 0 for t in (cos, sin)]
    strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), *batch_strides)
    return (k, v, cos, sin, *norms, *strides)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    split_len: int | None = None,
    block_n: int | None = None,
    counters: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    head_norms: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Single-token decode attention over a static KV cache (Triton, split-K flash-decoding).

    Same contract as :func:`decode_attention_reference`: ``q`` ``[B, Hq, D]``, caches
    ``[S, Hkv, L, D]``, ``slots`` ``[B]`` (integer), ``seq_lens`` ``[B]`` (int32/int64, each
    ``1 <= seq_len <= L``; larger values are clamped to ``L``), GQA head mapping
    ``h -> h // (Hq // Hkv)``, softmax of ``scale * q . k`` over the valid positions only,
    fp32 accumulation, output ``[B, Hq, D]`` in ``q``'s dtype.  ``q`` is cast to the cache
    dtype before the products.  Positions ``>= seq_len`` are never loaded.

    CUDA-graph safe: only shapes and dtypes are inspected on the host; the grid is
    ``(B, Hkv, cdiv(L, split_len))`` (plus ``(B, Hkv)`` for the merge without ``counters``), and
    the fp32 workspace is allocated from shapes alone.  Splits past ``seq_len`` exit at once.

    Args:
        split_len: positions per split (power of two, >= 16).  Default: chosen from ``L`` only,
            see :func:`_default_split_len`.  Tests shrink it to force several splits.
        block_n: positions per K/V tile inside a split (power of two, >= 16, divides
            ``split_len``).  Default ``min(64, split_len)``.
        counters: int32 ``[>= B, >= Hkv]`` on the device, all zero, kept by the caller across
            calls (e.g. one per cache). With it the last split of each (row, kv head) to finish
            merges the splits itself and the second launch is skipped (except for fp32 caches
            with D > 64); every call leaves the counters at zero again.
        new_kv: ``(k, v, cos, sin)`` of the step's new token, to write and rotate in the same
            launch (what `operators.triton.fused.rope_write_kv` would do first): ``q`` and
            ``k`` ``[B, Hkv, D]`` arrive unrotated, ``v`` ``[B, Hkv, D]``, ``cos``/``sin``
            ``[B, D]`` or ``[1, D]`` (HF's ``rotate_half`` convention and rounding, in q's
            dtype); the new
            position of row ``b`` is ``seq_lens[b] - 1``, whose split writes k and v there
            before reading it. ``head_norms = (q_weight, k_weight, eps)`` RMS-normalises each
            q and k head first (Qwen3). Last dims contiguous.

    Supports any head dim ``1 <= D <= 256`` (non powers of two such as 96 are padded and
    masked).  Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("decode_attention needs triton; use decode_attention_reference")
    _check_inputs(q, k_cache, v_cache, slots, seq_lens)
    B, Hq, D = q.shape
    _, Hkv, L, _ = k_cache.shape
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"decode_attention supports head dims 1..{_MAX_HEAD_DIM}, got D={D}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported q dtype {q.dtype}")
    if k_cache.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported cache dtype {k_cache.dtype}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    _check_triton_call("decode_attention", q, k_cache, v_cache, slots, seq_lens)
    rope = _rope_operands(q, k_cache, new_kv, head_norms)

    group = Hq // Hkv
    if split_len is None:
        split_len = _default_split_len(L)
    if block_n is None:
        block_n = min(64, split_len)
    for name, val in (("split_len", split_len), ("block_n", block_n)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    if split_len % block_n:
        raise ValueError(f"block_n={block_n} must divide split_len={split_len}")

    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0 or L == 0:
        return out

    num_splits = triton.cdiv(L, split_len)
    single = num_splits == 1
    block_d = max(16, _next_pow2(D))
    # the merge: a group's query heads and BLOCK_S splits at once (MERGE_G * BLOCK_S * D <= 4096)
    merge_g = _next_pow2(group)
    block_s = max(1, min(_next_pow2(num_splits), 4096 // (merge_g * block_d)))
    # fp32 at D > 64 already fills the registers of the split kernel (FMA products): merging
    # in it too spills on sm_90, so it keeps the second launch (fp32 serves exactness tests)
    wide_fp32 = k_cache.dtype == torch.float32 and D > 64
    fused_combine = counters is not None and not single and not wide_fp32
    if counters is not None and (
        counters.dtype != torch.int32
        or counters.dim() != 2
        or counters.shape[0] < B
        or counters.shape[1] < Hkv
        or counters.stride(1) != 1
        or counters.device != q.device
    ):
        raise ValueError(
            f"counters must be int32 [>= {B}, >= {Hkv}] with contiguous rows on {q.device}, got "
            f"{counters.dtype} {tuple(counters.shape)} on {counters.device}"
        )
    if single:  # the split kernel writes the output directly; the workspace is unused
        m_ws = l_ws = torch.empty((1, 1, 1), dtype=torch.float32, device=q.device)
        acc_ws = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
    else:
        m_ws = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
        l_ws = torch.empty_like(m_ws)
        acc_ws = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)

    _decode_split_kernel[(B, Hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        slots,
        seq_lens,
        out,
        m_ws,
        l_ws,
        acc_ws,
        float(scale) * _LOG2E,
        L,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        *m_ws.stride(),
        *acc_ws.stride(),
        counters if fused_combine else m_ws,
        counters.stride(0) if fused_combine else 0,
        *rope,
        GROUP=group,
        HEAD_DIM=D,
        BLOCK_G=max(16, _next_pow2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        SPLIT_LEN=split_len,
        SINGLE_SPLIT=single,
        FUSED_COMBINE=fused_combine,
        NUM_SPLITS=num_splits,
        MERGE_G=merge_g,
        BLOCK_S=block_s,
        # fp32 caches: exact fp32 products (the default would silently round to tf32).
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        UPCAST_DOT=interpreted() and k_cache.dtype == torch.bfloat16,
        ROPE=new_kv is not None,
        NORM=head_norms is not None,
        HALF=D // 2,
        BLOCK_HALF=max(16, _next_pow2(D // 2)),
        # fp32 products run on FMA units, not tensor cores: at D > 64 four warps spill registers
        # on sm_90 (ptxas, tests/compile_for_gpu.py)
        num_warps=8 if k_cache.dtype == torch.float32 and D > 64 else 4,
        num_stages=2,
    )
    if not single and not fused_combine:
        _decode_combine_kernel[(B, Hkv)](
            seq_lens,
            m_ws,
            l_ws,
            acc_ws,
            out,
            L,
            *m_ws.stride(),
            *acc_ws.stride(),
            *out.stride(),
            GROUP=group,
            HEAD_DIM=D,
            MERGE_G=merge_g,
            BLOCK_D=block_d,
            BLOCK_S=block_s,
            SPLIT_LEN=split_len,
            NUM_SPLITS=num_splits,
            num_warps=4,
        )
    return out
