"""Static-cache attention for GQA models (Llama, Qwen2/3, Mistral/Mixtral, Qwen3-MoE, OLMoE).

The operator fuses the q/k/v projections into one matmul, writes the new K/V into the engine's
fixed-size cache (`ktinject.cache`) at the current positions, and attends over each sequence's
valid length only: SDPA with an offset causal mask for prefill chunks, and a flash-decoding kernel
(Triton on GPU, C on CPU, torch where neither applies) for single-token decode, which is CUDA-graph
safe because lengths are read from device tensors. Eager float32 decode on a CPU rotates q and k
and writes the cache in one C++ call before that kernel (`_rope_write_native`). Outside an engine
context it behaves exactly like the Hugging Face module it replaced (Hugging Face cache, Hugging
Face mask), so `model.generate()` keeps working.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from ktinject.cache import AttentionContext, LayerSpec, current_context
from ktinject.errors import RuleError
from operators import native
from operators.base import Operator, beside, check_source, fuse_keys_on_load, fused_linear
from operators.linear import (
    eager_or_op,
    linear_dtype_device,
    native_available,
    native_projection,
)
from operators.native import ops as native_ops
from operators.triton.decode_attention import decode_attention_reference
from operators.triton.fused import (
    rope,
    rope_write_kv,
    use_triton,
    write_kv,
    write_kv_reference,
)
from operators.triton.gemv import fused_gemv_preferred

# Families whose apply_rotary_pos_emb is Llama's rotate-half RoPE (what the Triton kernel does)
ROTATE_HALF_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "olmoe")


class StaticCacheAttention(Operator):
    """Drop-in for Hugging Face GQA attention modules with q/k/v/o projections."""

    def __init__(
        self,
        *,
        qkv: nn.Module,
        o_proj: nn.Module,
        q_norm: nn.Module | None,
        k_norm: nn.Module | None,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float,
        layer_idx: int,
        rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        clip_qkv: float | None = None,
    ) -> None:
        super().__init__()
        self.qkv = qkv
        self.o_proj = o_proj
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.norm_per_head = q_norm is not None and q_norm.weight.shape[0] == head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.layer_idx = layer_idx
        self.rotary = rotary
        family = rotary.__module__.rpartition(".modeling_")[2]
        self.fused_rope = family in ROTATE_HALF_FAMILIES
        self.clip_qkv = clip_qkv
        self.is_causal = True
        self.split = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        fuse_keys_on_load(self, ("q_proj", "k_proj", "v_proj"), "qkv")

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
        parts = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx")
        check_source(cls, module, kwargs, parts)
        window = getattr(module, "sliding_window", getattr(config, "sliding_window", None))
        if window is not None and window < getattr(config, "max_position_embeddings", 0):
            raise RuleError(
                f"{name} uses a sliding window of {window} tokens, which StaticCacheAttention "
                f"does not implement; drop the attention rule for this model (it then runs "
                f"Hugging Face attention)."
            )
        head_dim = module.head_dim
        q, k = module.q_proj, module.k_proj
        o_proj = module.o_proj
        if device is not None and not o_proj.weight.is_meta:
            o_proj = o_proj.to(device)
        rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
        if rotary is None:
            raise TypeError(f"{type(module).__module__} has no apply_rotary_pos_emb")
        q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        if device is not None and q_norm is not None and not q_norm.weight.is_meta:
            q_norm, k_norm = q_norm.to(device), k_norm.to(device)
        return cls(
            qkv=fused_linear([q, k, module.v_proj], device),
            o_proj=o_proj,
            q_norm=q_norm,
            k_norm=k_norm,
            num_heads=q.weight.shape[0] // head_dim,
            num_kv_heads=k.weight.shape[0] // head_dim,
            head_dim=head_dim,
            scaling=module.scaling,
            layer_idx=module.layer_idx,
            rotary=rotary,
            clip_qkv=getattr(config, "clip_qkv", None),
        )

    def cache_spec(self) -> LayerSpec:
        """What the engine allocates for this layer."""
        dtype, device = linear_dtype_device(self.qkv)
        return LayerSpec(
            kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            value_dim=self.head_dim,
            dtype=dtype,
            device=device,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        out = self.attend(
            self.qkv(hidden_states), position_embeddings, attention_mask, past_key_values
        )
        return out, None

    def attend(
        self,
        qkv: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
    ) -> torch.Tensor:
        """Everything after the q/k/v projection, whose output [B, T, (Hq + 2 Hkv) D] is `qkv`:
        a decoder layer that computes the projection itself (with the norm before it folded in,
        `operators.layer`) continues here."""
        batch, length, _ = qkv.shape
        context = current_context(qkv.device)
        if context is not None and context.prefill_start is None and length == 1:
            q = self._rope_write_native(qkv, position_embeddings, context)
            if q is not None:  # eager float32 decode on a CPU
                out = self._attend_cache(q[:, :, None], context)
                return self.o_proj(out.reshape(batch, length, -1))
        q, k, v = qkv.split(self.split, dim=-1)
        fused = self.fused_rope and use_triton(qkv)
        # decode on GPU: per-head norms, rotation and the K/V write in one launch
        one_launch = fused and context is not None and context.prefill_start is None
        head_norms = self._head_norms(qkv) if one_launch else None
        if self.q_norm is not None and not self.norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        if self.norm_per_head and head_norms is None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        if one_launch and fused_gemv_preferred():  # the fused decode graph: one launch in all
            new_kv = (k[:, :, 0], v[:, :, 0], cos[:, 0], sin[:, 0])
            out = self._attend_cache(q, context, new_kv=new_kv, head_norms=head_norms)
        elif one_launch:
            k_cache, v_cache = context.cache.kv[self.layer_idx]
            rows, positions = context.slots, context.positions[:, 0]
            q = rope_write_kv(
                q, k, v, cos, sin, k_cache, v_cache, rows, positions, head_norms=head_norms
            )
            out = self._attend_cache(q, context)
        else:
            q, k = (rope if fused else self.rotary)(q, k, cos, sin)
            if context is None:
                out = self._hf_attention(q, k, v, attention_mask, past_key_values)
            elif context.prefill_start is not None:
                out = self._prefill(q, k, v, context)
            else:
                out = self._decode(q, k, v, context)
        return self.o_proj(out.reshape(batch, length, -1))

    def _rope_write_native(
        self,
        qkv: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        context: AttentionContext,
    ) -> torch.Tensor | None:
        """One decode token per row, eagerly in float32 on a CPU: the per-head norms (if any),
        the rotation of q and k and the K/V write in one C++ call instead of ~25 torch calls
        (`operators.native.ops.rope_write_kv`). Returns the rotated q [B, Hq, D], or None where
        that call does not apply (another rotation, clipping, norms over all heads, no C++
        build, other dtypes)."""
        k_cache, v_cache = context.cache.kv[self.layer_idx]
        if not self.fused_rope or self.clip_qkv is not None or position_embeddings is None:
            return None
        cos, sin = position_embeddings
        if not native_ops.layer_ops_serve(qkv, cos, sin, k_cache, v_cache):
            return None
        norms: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = (None, None, 0.0)
        if self.q_norm is not None:
            norms = self._head_norms(qkv)
            if norms is None:
                return None
        return native_ops.rope_write_kv(
            qkv.reshape(qkv.shape[0], -1),
            cos[:, 0],
            sin[:, 0],
            k_cache,
            v_cache,
            context.slots,
            context.positions[:, 0],
            self.num_heads,
            *norms,
        )

    def native_decode_weights(self) -> tuple[tuple[Any, ...], list[Any], int] | None:
        """What a decoder layer passes for this attention when it decodes in one C++ call
        (`operators.layer`, `operators.native.ops.decode_layer`): (num_heads, q norm, k norm,
        their eps, scale), the q/k/v and output projections, and the most rows the projections
        take there. None where this attention's eager float32 CPU decode would not take the
        C++ rotation, the C decode attention kernel and C-kernel projections (so one call would
        not compute the same values)."""
        fits = (
            self.fused_rope
            and self.clip_qkv is None
            and self.head_dim % 16 == 0  # `native.caches_fit_decode_attention`'s static part
            and self.num_heads % self.num_kv_heads == 0
        )
        norms: tuple[Any, Any, float] | None = (None, None, 0.0)
        if self.q_norm is not None:
            norms = self._head_norms(torch.empty(0))
        qkv, o_proj = native_projection(self.qkv), native_projection(self.o_proj)
        if not fits or norms is None or qkv is None or o_proj is None:
            return None
        heads = (self.num_heads, *norms, self.scaling)
        return heads, [qkv[0], o_proj[0]], min(qkv[1], o_proj[1])

    def _head_norms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(q weight, k weight, eps) of per-head RMSNorms that `rope_write_kv` can apply itself:
        RMSNorm-like modules whose weights have the activations' dtype and device (else None)."""
        if not self.norm_per_head:
            return None
        norms = (self.q_norm, self.k_norm)
        eps = {getattr(n, "variance_epsilon", getattr(n, "eps", None)) for n in norms}
        if len(eps) != 1 or None in eps or not all(beside(n.weight, x) for n in norms):
            return None
        return self.q_norm.weight, self.k_norm.weight, float(eps.pop())

    def _hf_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
    ) -> torch.Tensor:
        """Exactly what the replaced module does with Hugging Face's cache and mask."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out, _ = sdpa_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)
        return out

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext
    ) -> torch.Tensor:
        """One chunk of one sequence: write K/V at [start, start+T), attend causally over
        [0, start+T). The mask is offset by `start`, so any chunking gives the same result."""
        k_cache, v_cache = context.cache.kv[self.layer_idx]
        slot, start, length = context.prefill_slot, context.prefill_start, q.shape[2]
        end = start + length
        k_cache[slot, :, start:end] = k[0]
        v_cache[slot, :, start:end] = v[0]
        keys, values = k_cache[slot, :, :end][None], v_cache[slot, :, :end][None]
        out = chunk_attention(
            q, keys, values, start, self.scaling, enable_gqa=self.num_key_value_groups > 1
        )
        return out.transpose(1, 2)

    def _decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext
    ) -> torch.Tensor:
        """One new token per row: write it at `positions`, attend over `seq_lens` positions."""
        k_cache, v_cache = context.cache.kv[self.layer_idx]
        if context.host_rows is not None and not use_triton(q):
            for row, (slot, position) in enumerate(context.host_rows):  # slices, no index tensors
                k_cache[slot, :, position] = k[row, :, 0]
                v_cache[slot, :, position] = v[row, :, 0]
            if native_attention_fits(q, k_cache, v_cache):
                return self._attend_cache(q, context)
            return self._attend_rows(q, k_cache, v_cache, context.host_rows)
        rows, positions = context.slots, context.positions[:, 0]
        write = write_kv if use_triton(q) else write_kv_reference
        write(k[:, :, 0], v[:, :, 0], k_cache, v_cache, rows, positions)
        return self._attend_cache(q, context)

    def _attend_cache(
        self,
        q: torch.Tensor,
        context: AttentionContext,
        **rotation: Any,
    ) -> torch.Tensor:
        """Attention of one new query per row over its slot's valid cache positions (the new
        token's K/V already written, or written by the kernel itself from `rotation`'s `new_kv`
        and `head_norms`, see `decode_attention`): [B, Hq, 1, D] -> [B, 1, Hq, D]."""
        k_cache, v_cache = context.cache.kv[self.layer_idx]
        rows = context.slots
        if use_triton(q):
            from operators.triton.decode_attention import decode_attention

            counters = context.cache.split_counters.get(k_cache.device)
            out = decode_attention(
                q[:, :, 0],
                k_cache,
                v_cache,
                rows,
                context.seq_lens,
                self.scaling,
                counters=counters,
                **rotation,
            )
        elif native_attention_fits(q, k_cache, v_cache):
            attention = eager_or_op(native.decode_attention, native_ops.decode_attention)
            out = attention(q[:, :, 0], k_cache, v_cache, rows, context.seq_lens, self.scaling)
        else:
            out = decode_attention_reference(
                q[:, :, 0], k_cache, v_cache, rows, context.seq_lens, self.scaling, context.max_len
            )
        return out[:, None]

    def _attend_rows(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        host_rows: list[tuple[int, int]],
    ) -> torch.Tensor:
        """Eager CPU decode where the C kernel does not apply: slots and positions are known on
        the host, so each row attends over a view of exactly its valid prefix (no gather, no
        masking)."""
        outs = []
        for row, (slot, position) in enumerate(host_rows):
            end = position + 1
            outs.append(
                F.scaled_dot_product_attention(
                    q[row : row + 1],
                    k_cache[slot : slot + 1, :, :end],
                    v_cache[slot : slot + 1, :, :end],
                    scale=self.scaling,
                    enable_gqa=self.num_key_value_groups > 1,
                )
            )
        return torch.cat(outs).transpose(1, 2)


def native_attention_fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether decode attention runs through the C kernel (`operators.native`): a float32 CPU
    cache it can read in place. Its 30 calls for SmolLM2 at 1,024 positions took 6.4-7.2 ms on a
    2-core AVX2 EPYC (2026-11-29), SDPA over each row's view 9.6-11.7 ms; whole decode steps at
    1,000-1,032 context, two engines alternating in one process: eager fp32 78 vs 87 ms, compiled
    `llama-cpu-q4` 32 vs 34 ms against its gathered, masked torch reference."""
    return native.fits_decode_attention(q, k_cache, v_cache) and native_available()


def chunk_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    scale: float,
    *,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA of a prefill chunk whose T queries sit at positions [start, start+T) over keys at
    [0, start+T): query i sees keys <= start+i, so any chunking gives the same result."""
    length, end = q.shape[2], keys.shape[2]
    mask = None
    if start > 0:
        mask = torch.ones(length, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(
        q,
        keys,
        values,
        attn_mask=mask,
        is_causal=mask is None and length > 1,
        scale=scale,
        enable_gqa=enable_gqa,
    )
