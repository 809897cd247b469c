"""Pre-norm decoder layer with the post-attention residual add fused into the RMSNorm after it.

Hugging Face writes `hidden = residual + attn_out` and then normalizes it: two kernels that each
read the hidden state. On GPU `add_rms_norm` does both in one launch (one kernel per layer fewer,
which matters when decode is bound by launches). The layer keeps its children under their own
names, so checkpoints load unchanged and rules still replace the children inside it.
"""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import nn

from operators.base import Operator, check_source
from operators.triton.fused import add_rms_norm, use_triton

PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class FusedResidualDecoderLayer(Operator):
    """Drop-in for Llama-style pre-norm decoder layers (Llama, Qwen2/3, Mixtral, Qwen3-MoE,
    OLMoE, DeepSeek-V3) whose forward returns the new hidden state."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp

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
        check_source(cls, module, kwargs, PARTS)
        norm = module.post_attention_layernorm
        if not hasattr(norm, "weight") or not hasattr(norm, "variance_epsilon"):
            raise TypeError(f"{type(norm).__name__} is not an RMSNorm with weight/variance_epsilon")
        return cls(module)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        norm = self.post_attention_layernorm
        if use_triton(hidden_states):
            hidden_states, residual = add_rms_norm(
                hidden_states, residual, norm.weight, norm.variance_epsilon
            )
        else:
            residual = residual + hidden_states
            hidden_states = norm(residual)
        return residual + self.mlp(hidden_states)
