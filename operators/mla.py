"""Static-cache multi-head latent attention (MLA) for DeepSeek-V2/V3.

MLA projects every token to one small latent `c_kv` (`kv_lora_rank` wide, shared by all heads)
plus one rotary key `k_pe` (`qk_rope_head_dim` wide); the per-head keys and values are linear
images of the latent through `kv_b_proj`. So the cache stores only `c_kv` (after
`kv_a_layernorm`) and `k_pe` (after RoPE), never the expanded K/V. Per token and layer that is
`kv_lora_rank + qk_rope_head_dim` values instead of `heads * (qk_head_dim + v_head_dim)`:
576 vs 40,960 values for DeepSeek-V3 (1,152 vs 81,920 bytes in bf16, 71x less), 40 vs 160 for
the tiny test model.

Prefill expands K/V for the valid prefix through `kv_b_proj` (compute bound, reads the cache
once). Decode is bandwidth bound, so it uses the *absorbed* form instead: the key part of
`kv_b_proj` is folded into the query and its value part into the output, and attention runs over
the latent directly -- each step reads `kv_lora_rank + qk_rope_head_dim` values per position, not
the expanded K/V. Outside an engine context the operator computes exactly what the Hugging Face
module does (its cache, its mask, its attention backend), so `model.generate()` keeps working.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import nn

from ktinject.cache import AttentionContext, LayerSpec, current_context
from operators.attention import chunk_attention
from operators.base import Operator, check_source
from operators.triton.fused import write_kv_reference

_SUBMODULES = (
    "q_proj",
    "q_a_proj",
    "q_a_layernorm",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_a_layernorm",
    "kv_b_proj",
    "o_proj",
)


class StaticCacheMLA(Operator):
    """Drop-in for `DeepseekV3Attention` (and look-alikes) caching the latent, not K/V.

    The original projection and norm submodules are kept under their original names, so a
    checkpoint's `self_attn.*` keys load unchanged after injection.
    """

    def __init__(
        self,
        *,
        submodules: dict[str, nn.Module | None],
        config: Any,
        num_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        kv_lora_rank: int,
        num_key_value_groups: int,
        scaling: float,
        attention_dropout: float,
        layer_idx: int,
        rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        eager_attention: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    ) -> None:
        super().__init__()
        for part, module in submodules.items():
            setattr(self, part, module)
        self.config = config  # the HF attention backends read it (e.g. _attn_implementation)
        self.num_heads = num_heads
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.num_key_value_groups = num_key_value_groups
        self.scaling = scaling
        self.attention_dropout = attention_dropout
        self.layer_idx = layer_idx
        self.rotary = rotary
        self.eager_attention = eager_attention
        self.is_causal = True

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
        parts = (*_SUBMODULES, "config", "scaling", "layer_idx", "kv_lora_rank")
        check_source(cls, module, kwargs, parts)
        if module.kv_b_proj.bias is not None:
            # absorption folds kv_b_proj into the query and the output; a bias would not fold
            raise TypeError(f"{type(module).__name__}.kv_b_proj has a bias; MLA expects none")
        modeling = sys.modules[type(module).__module__]
        rotary_name = (
            "apply_rotary_pos_emb_interleave"
            if module.config.rope_interleave
            else "apply_rotary_pos_emb"
        )
        rotary = getattr(modeling, rotary_name, None)
        eager = getattr(modeling, "eager_attention_forward", None)
        if rotary is None or eager is None:
            raise TypeError(f"{modeling.__name__} has no {rotary_name} / eager_attention_forward")
        operator = cls(
            submodules={part: getattr(module, part) for part in _SUBMODULES},
            config=module.config,
            num_heads=module.num_heads,
            qk_nope_head_dim=module.qk_nope_head_dim,
            qk_rope_head_dim=module.qk_rope_head_dim,
            v_head_dim=module.v_head_dim,
            kv_lora_rank=module.kv_lora_rank,
            num_key_value_groups=module.num_key_value_groups,
            scaling=module.scaling,  # HF's own value: qk_head_dim**-0.5 with yarn mscale applied
            attention_dropout=module.attention_dropout,
            layer_idx=module.layer_idx,
            rotary=rotary,
            eager_attention=eager,
        )
        if device is not None and not module.kv_b_proj.weight.is_meta:
            operator.to(device)  # moves the original parameters in place, no second copy
        return operator

    def cache_spec(self) -> LayerSpec:
        """One "head" of latent (as K) and rotary key (as V) per position: see the module doc."""
        weight = self.kv_a_proj_with_mqa.weight
        return LayerSpec(
            kv_heads=1,
            head_dim=self.kv_lora_rank,
            value_dim=self.qk_rope_head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        q_nope, q_pe, latent, k_pe = self._project(hidden_states, position_embeddings)
        context = current_context(hidden_states.device)
        weights = None
        if context is None:
            out, weights = self._hf_attention(
                q_nope, q_pe, latent, k_pe, attention_mask, past_key_values, kwargs
            )
        elif context.prefill_start is not None:
            out = self._prefill(q_nope, q_pe, latent, k_pe, context)
        else:
            out = self._decode(q_nope, q_pe, latent, k_pe, context)
        return self.o_proj(out.reshape(batch, length, -1).contiguous()), weights

    def _project(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The HF module's projections and RoPE: q_nope [B,H,T,nope], q_pe [B,H,T,rope], the
        normed latent [B,1,T,kv_lora_rank] and the rotated shared key k_pe [B,1,T,rope]."""
        batch, length, _ = hidden_states.shape
        if self.q_proj is not None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(batch, length, -1, self.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        compressed = self.kv_a_proj_with_mqa(hidden_states)
        latent, k_pe = compressed.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(batch, 1, length, self.kv_lora_rank)
        k_pe = k_pe.view(batch, 1, length, self.qk_rope_head_dim)
        cos, sin = position_embeddings
        q_pe, k_pe = self.rotary(q_pe, k_pe, cos, sin)
        return q_nope, q_pe, latent, k_pe

    def _expand(
        self, latent: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [B,H,S,qk_head_dim] and values [B,H,S,v_head_dim] from the latent
        [B,1,S,kv_lora_rank] and the shared rotary key [B,1,S,rope]."""
        batch, _, length, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch, length, self.num_heads, -1).transpose(1, 2)
        k_nope, values = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        keys = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return keys, values

    def _hf_attention(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exactly what the replaced module does: HF cache (latents), HF mask, HF backend."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if past_key_values is not None:
            latent, k_pe = past_key_values.update(latent, k_pe, self.layer_idx)
        keys, values = self._expand(latent, k_pe)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self.eager_attention
        )
        return attention(
            self,
            torch.cat((q_nope, q_pe), dim=-1),
            keys,
            values,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )

    def _prefill(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
        context: AttentionContext,
    ) -> torch.Tensor:
        """One chunk of one sequence: write latent/k_pe at [start, start+T), expand K/V for
        [0, start+T) and attend causally with the mask offset by `start`."""
        latent_cache, rope_cache = context.cache.kv[self.layer_idx]
        slot, start, length = context.prefill_slot, context.prefill_start, q_nope.shape[2]
        end = start + length
        latent_cache[slot, :, start:end] = latent[0]
        rope_cache[slot, :, start:end] = k_pe[0]
        keys, values = self._expand(
            latent_cache[slot, :, :end][None], rope_cache[slot, :, :end][None]
        )
        out = chunk_attention(torch.cat((q_nope, q_pe), dim=-1), keys, values, start, self.scaling)
        return out.transpose(1, 2)

    def _decode(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
        context: AttentionContext,
    ) -> torch.Tensor:
        """One new token per row, absorbed form: write it at `positions`, then attend over the
        first `seq_lens` latents; CUDA-graph safe (no host reads of device values)."""
        latent_cache, rope_cache = context.cache.kv[self.layer_idx]
        rows, positions = context.slots, context.positions[:, 0]
        new_latent, new_rope = latent[:, :, 0], k_pe[:, :, 0]
        write_kv_reference(new_latent, new_rope, latent_cache, rope_cache, rows, positions)
        if context.max_len is not None:  # a host bound (eager decode): read only what can be valid
            latent_cache = latent_cache[:, :, : context.max_len]
            rope_cache = rope_cache[:, :, : context.max_len]
        kv_b = self.kv_b_proj.weight.reshape(self.num_heads, -1, self.kv_lora_rank)
        w_k, w_v = kv_b.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_latent = torch.einsum("bhn,hnr->bhr", q_nope[:, :, 0], w_k)
        out_latent = mla_decode_attention(
            q_latent, q_pe[:, :, 0], latent_cache, rope_cache, rows, context.seq_lens, self.scaling
        )
        return torch.einsum("bhr,hvr->bhv", out_latent, w_v)[:, None]


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    rope_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Single-token absorbed MLA attention over a static latent cache, in plain torch.

    Args:
        q_latent: [B, H, R] query with kv_b_proj's key part folded in (R = kv_lora_rank).
        q_pe: [B, H, P] rotated query part (P = qk_rope_head_dim).
        latent_cache: [S, 1, L, R] normed latents; rope_cache: [S, 1, L, P] rotated keys.
        slots: [B] cache slot of each row; seq_lens: [B] valid positions (>= 1) of that slot.
        scale: softmax scale of the full q.k product.

    Returns [B, H, R]: the softmax-weighted latents, in `q_latent`'s dtype (the math runs in
    fp32). Positions >= seq_lens[b] never influence the result, even if they hold NaN, and
    nothing is read on the host, so the function is CUDA-graph capturable.
    """
    length = latent_cache.shape[2]
    rows = slots.to(device=q_latent.device, dtype=torch.long)
    valid = torch.arange(length, device=q_latent.device)[None, :] < seq_lens[:, None]  # [B, L]
    # torch.where (not multiplication) so NaN garbage past seq_lens cannot leak into the result
    latent = torch.where(valid[..., None], latent_cache[rows, 0].float(), 0.0)  # [B, L, R]
    rope = torch.where(valid[..., None], rope_cache[rows, 0].float(), 0.0)  # [B, L, P]
    scores = q_latent.float() @ latent.transpose(1, 2) + q_pe.float() @ rope.transpose(1, 2)
    scores = (scores * scale).masked_fill(~valid[:, None, :], float("-inf"))  # [B, H, L]
    return (torch.softmax(scores, dim=-1) @ latent).to(q_latent.dtype)
