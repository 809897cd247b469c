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

Eager float32 decode on a CPU goes the other way: where every part of the layer has a C or C++
kernel (C-kernel projections, fp32 or GGUF blocks; the C decode attention; RMSNorm operators), the
engine prepares the layer (`prepare_native_decode`) and each step is one C++ call
(`operators.native.ops.decode_layer`) that runs those kernels in the same order: the same values,
without ~25 calls through Python a layer. On a 2-core AVX2 EPYC (2026-11-30, same process,
alternating) a SmolLM2 step took 30 -> 22.5 ms with `llama-cpu-q4`, 54 -> 42 ms in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import nn

from ktinject.cache import current_context
from operators import native
from operators.base import Operator, beside, check_source
from operators.linear import DecodeLinear
from operators.mlp import FusedGatedMLP
from operators.native import ops as native_ops
from operators.norm import RMSNorm
from operators.triton.fused import add_rms_norm, use_triton
from operators.triton.gemv import MAX_ROWS, fused_gemv_preferred, norm_linear, silu_linear

PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass(frozen=True)
class NativeDecode:
    """What a layer's one-call decode (`FusedResidualDecoderLayer.prepare_native_decode`) passes
    that is the same at every step: `operators.native.ops.decode_layer`'s arguments after the
    step's own, with what the step checks them against."""

    layer_idx: int  # the attention's cache layer
    max_rows: int  # the most rows the projections take in the C kernels
    heads: tuple[int, int]  # (query heads, head size), for the cache check
    weights: tuple[Any, ...]


class FusedResidualDecoderLayer(Operator):
    """Drop-in for Llama-style pre-norm decoder layers (Llama, Qwen2/3, Mixtral, Qwen3-MoE,
    OLMoE, DeepSeek-V3) whose forward returns the new hidden state."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.native_decode: NativeDecode | None = None  # set by prepare_native_decode

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
        native_out = self._native_decode(hidden_states, position_embeddings)
        if native_out is not None:
            return native_out
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

    def prepare_native_decode(self) -> bool:
        """Gather what decoding this layer in one C++ call passes that stays the same from step
        to step (`_native_decode`), where every part of the layer would take its C or C++ kernel
        in eager float32 CPU decode anyway: the same kernels in the same order, so the same
        values. The engine calls this when it is built; from then on it owns the model (as its
        compiled step assumes too): a module or weight replaced later needs a new engine.
        Returns whether this layer decodes in one call."""
        self.native_decode = None
        attention = getattr(self.self_attn, "native_decode_weights", lambda: None)()
        mlp = getattr(self.mlp, "native_decode_weights", lambda: None)()
        norms = (self.input_layernorm, self.post_attention_layernorm)
        if attention is None or mlp is None or native_ops.kernels != "C++":
            return False
        if not all(isinstance(n, RMSNorm) and native.cpu_float32(n.weight) for n in norms):
            return False
        (heads, (qkv, o_proj), attention_rows), ((gate_up, down), mlp_rows) = attention, mlp
        first, second = norms
        self.native_decode = NativeDecode(
            layer_idx=self.self_attn.layer_idx,
            max_rows=min(attention_rows, mlp_rows),
            heads=(self.self_attn.num_heads, self.self_attn.head_dim),
            weights=(
                *(first.weight, first.variance_epsilon, qkv, *heads, o_proj),
                *(second.weight, second.variance_epsilon, gate_up, down),
            ),
        )
        return True

    def _native_decode(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor | None:
        """This layer for one decode token per row of x [B, 1, H] in one C++ call
        (`operators.native.ops.decode_layer`) instead of ~25 through Python, when prepared for
        it (`prepare_native_decode`) and the step is eager float32 on a CPU; else None."""
        plan = self.native_decode
        if plan is None or position_embeddings is None or x.dim() != 3:
            return None
        cos, sin = position_embeddings
        if not native_ops.layer_ops_serve(x, cos, sin):  # also: no graph being compiled
            return None
        batch, length, width = x.shape
        context = current_context(x.device)
        if length != 1 or batch > plan.max_rows or context is None:
            return None
        k_cache, v_cache = context.cache.kv[plan.layer_idx]
        if context.prefill_start is not None or not native.caches_fit_decode_attention(
            k_cache, v_cache, *plan.heads
        ):
            return None
        out = native_ops.decode_layer(
            *(x.reshape(batch, width), k_cache, v_cache, cos[:, 0], sin[:, 0]),
            *(context.slots, context.positions[:, 0], context.seq_lens, *plan.weights),
        )
        return out.view(batch, 1, width)

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


def prepare_native_decode(model: nn.Module) -> int:
    """`FusedResidualDecoderLayer.prepare_native_decode` for every such layer of `model` (the
    engine calls this when it is built); returns how many decode in one C++ call."""
    layers = [m for m in model.modules() if isinstance(m, FusedResidualDecoderLayer)]
    return sum(layer.prepare_native_decode() for layer in layers)
