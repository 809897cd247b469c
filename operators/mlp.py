"""Gated MLP (SwiGLU and friends) with the gate and up projections fused into one matmul.

Reading one [2I, H] weight instead of two [I, H] weights halves the number of matmul launches and
lets the GEMV stream one contiguous block, which is what decode time is made of.
"""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import nn

from operators.base import Operator, check_source, fuse_keys_on_load, fused_linear
from operators.linear import native_projection
from operators.native import ops as native_ops
from operators.triton.fused import silu_mul, use_triton

SILU_CLASSES = ("SiLU", "SiLUActivation")


class FusedGatedMLP(Operator):
    """Drop-in for modules with `gate_proj`, `up_proj`, `down_proj` and `act_fn`
    (Llama, Qwen2/3, Mistral, DeepSeek dense MLPs). Loads checkpoints with the original keys."""

    def __init__(self, gate_up: nn.Module, down_proj: nn.Module, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_up = gate_up
        self.down_proj = down_proj
        self.act_fn = act_fn
        # SiLU and the product run as one kernel on GPU; other activations keep act_fn(gate) * up
        self.fused_silu = type(act_fn).__name__ in SILU_CLASSES
        fuse_keys_on_load(self, ("gate_proj", "up_proj"), "gate_up")

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
        check_source(cls, module, kwargs, ("gate_proj", "up_proj", "down_proj", "act_fn"))
        gate_up = fused_linear([module.gate_proj, module.up_proj], device)
        down = module.down_proj
        if device is not None and not down.weight.is_meta:
            down = down.to(device)
        return cls(gate_up, down, module.act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if self.fused_silu and use_triton(gate_up):
            return self.down_proj(silu_mul(gate_up))
        if self.fused_silu and native_ops.layer_ops_serve(gate_up):  # eager float32 on a CPU
            return self.down_proj(native_ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)

    def native_decode_weights(self) -> tuple[list[Any], int] | None:
        """([gate/up, down] as `operators.native.ops.decode_layer` takes projections, the most
        rows they take there), where this MLP's eager float32 CPU path is the C kernels and the
        C++ SiLU-and-mul; else None."""
        gate_up, down = native_projection(self.gate_up), native_projection(self.down_proj)
        if not self.fused_silu or gate_up is None or down is None:
            return None
        return [gate_up[0], down[0]], min(gate_up[1], down[1])
