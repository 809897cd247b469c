"""Pre-norm decoder layer with the post-attention residual add fused into the RMSNorm after it.

Hugging Face writes `hidden = residual + attn_out` and then normalizes it: two kernels that each
read the hidden state. On GPU `add_rms_norm` does both in one launch (one kernel per layer fewer,
which matters when decode is bound by launches; eagerly in float32 on a CPU, one C++ call instead
of HF's ~10 torch calls). The layer keeps its children under their own names, so checkpoints load
unchanged and rules still replace the children inside it.

When the engine prefers it (`operators.triton.gemv.fused_gemv_preferred`, decided by timing the
captured decode graph both ways), a decode step goes further: the input norm runs inside the
q/k/v projection, the residual add and post-attention norm inside the gate/up projection, and
SiLU-and-mul and the closing residual add inside the down projection (`norm_linear`,
`silu_linear`): four launches per layer fewer. In that step the attention operator also rotates
and caches the new token inside its decode-attention kernel (one launch fewer). Only plain
`nn.Linear` projections whose weights share the activations' dtype take that path; anything else
(a quantized linear from a rule, MoE experts, MLA attention) keeps the path above.
"""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import nn

from operators.base import Operator, beside, check_source
from operators.linear import DecodeLinear
from operators.mlp import FusedGatedMLP
from operators.native import ops as native_ops
from operators.triton.fused import add_rms_norm, use_triton
from operators.triton.gemv import MAX_ROWS, fused_gemv_preferred, norm_linear, silu_linear

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
        fused = self._fused_gemv(hidden_states)
        qkv = getattr(self.self_attn, "qkv", None)
        if fused and hasattr(self.self_attn, "attend") and _plain(qkv, hidden_states):
            norm = self.input_layernorm
            qkv_out, _ = norm_linear(
                hidden_states, None, norm.weight, norm.variance_epsilon, qkv.weight, qkv.bias
            )
            hidden_states = self.self_attn.attend(
                qkv_out, position_embeddings, attention_mask, past_key_values
            )
        else:
            hidden_states, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        norm, mlp = self.post_attention_layernorm, self.mlp
        if fused and _fused_silu(mlp, hidden_states):
            gate_up, residual = norm_linear(
                hidden_states,
                residual,
                norm.weight,
                norm.variance_epsilon,
                mlp.gate_up.weight,
                mlp.gate_up.bias,
            )
            return silu_linear(gate_up, mlp.down_proj.weight, mlp.down_proj.bias, residual)
        if use_triton(hidden_states) and norm.weight.device == hidden_states.device:
            hidden_states, residual = add_rms_norm(
                hidden_states, residual, norm.weight, norm.variance_epsilon
            )
        elif native_ops.layer_ops_serve(hidden_states, residual, norm.weight):
            hidden_states, residual = native_ops.add_rms_norm(
                hidden_states, residual, norm.weight, norm.variance_epsilon
            )
        else:
            residual = residual + hidden_states
            hidden_states = norm(residual)
        return residual + self.mlp(hidden_states)

    def _fused_gemv(self, x: torch.Tensor) -> bool:
        """Whether this step folds the norms into the projections (see the module docstring)."""
        if not (fused_gemv_preferred() and use_triton(x)) or x.numel() > MAX_ROWS * x.shape[-1]:
            return False
        norms = (self.input_layernorm, self.post_attention_layernorm)
        return all(hasattr(n, "variance_epsilon") and beside(n.weight, x) for n in norms)


def _plain(linear: nn.Module | None, x: torch.Tensor) -> bool:
    """A plain `nn.Linear` (or its CPU-decode twin, the same weights) in the activations' dtype
    and on their device (what the fused projections read)."""
    return type(linear) in (nn.Linear, DecodeLinear) and beside(linear.weight, x)


def _fused_silu(mlp: nn.Module, x: torch.Tensor) -> bool:
    return (
        isinstance(mlp, FusedGatedMLP)
        and mlp.fused_silu
        and _plain(mlp.gate_up, x)
        and _plain(mlp.down_proj, x)
    )
