"""Rotary embeddings looked up in a table instead of computed at every step.

Hugging Face's rotary modules (`LlamaRotaryEmbedding` and its copies) compute cos/sin for the
step's positions on every forward: an outer product, a concatenation, cos, sin, two scalings
and two casts, about eight small GPU kernels per decode step, all position-only arithmetic.
`RotaryTable` computes them once for every position of the engine's cache, by calling the HF
module itself on all positions, so the values are HF's to the bit, and a step then costs one
gather.

The table belongs to the cache (`StaticKVCache.derived`): positions never exceed the cache,
the engine checks that before any compute, and CUDA graphs captured with a cache read a table
that lives exactly as long as they do. Outside the engine (`model.generate()`), under
`torch.compile` (inductor fuses HF's arithmetic anyway) and for rope types whose frequencies
depend on the longest position at run time (`dynamic`, `longrope`), the HF module computes as
before.
"""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import nn

from ktinject.cache import StaticKVCache, current_context
from operators.base import Operator, check_source

RUNTIME_ROPE = ("dynamic", "longrope")  # HF's `dynamic_rope_update` recomputes these per call


class RotaryTable(Operator):
    """Drop-in for HF rotary modules: `forward(x, position_ids) -> (cos, sin)`, each
    [B, T, head_dim] in `x`'s dtype (views of one gathered [B, T, 2, head_dim] tensor)."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.source = source
        rope_type = source.rope_type
        self.static = "dynamic" not in rope_type and rope_type not in RUNTIME_ROPE

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
        check_source(cls, module, kwargs, ("inv_freq", "rope_type"))
        if not isinstance(module.rope_type, str):
            raise TypeError(
                f"{type(module).__name__} has one rope type per layer type "
                f"({module.rope_type}); RotaryTable takes a single one"
            )
        if device is not None:
            module.to(device)
        return cls(module)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        context = current_context()
        if context is None or not self.static or torch.compiler.is_compiling():
            return self.source(x, position_ids)
        both = self.table(context.cache, x.dtype, x.device)[position_ids]
        return both[..., 0, :], both[..., 1, :]

    def table(self, cache: StaticKVCache, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """cos and sin of every position of `cache`, [cache_lens, 2, head_dim], made on first
        use (a prefill or warm-up, never inside a graph capture: both run before one)."""
        key = (self, dtype, device)
        found = cache.derived.get(key)
        if found is None:
            positions = torch.arange(cache.cache_lens, device=device)[None]
            cos, sin = self.source(torch.empty(0, dtype=dtype, device=device), positions)
            found = cache.derived[key] = torch.stack((cos[0], sin[0]), dim=1)
        return found

    def extra_repr(self) -> str:
        kind = "table per cache" if self.static else "computed per call"
        return f"rope_type={self.source.rope_type!r}, {kind}"
