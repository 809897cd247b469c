"""RMSNorm as one fused call instead of HF's six elementwise kernels."""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from operators.base import Operator, take


class RMSNorm(Operator):
    """Drop-in for Llama-style RMSNorm modules (`weight`, `variance_epsilon`): normalizes in fp32
    like HF, then scales by the weight in the input dtype."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

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
        if kwargs:
            raise TypeError(f"RMSNorm takes no kwargs, got {sorted(kwargs)}")
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
        if eps is None or not hasattr(module, "weight"):
            raise TypeError(f"{type(module).__name__} has no weight/variance_epsilon to take")
        return cls(take(module.weight, device), float(eps))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        normed = F.rms_norm(
            hidden_states.float(), hidden_states.shape[-1:], eps=self.variance_epsilon
        )
        return self.weight * normed.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
