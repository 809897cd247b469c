"""The operator contract shared by every operator family."""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import nn


class Operator(nn.Module):
    """Base class: subclasses implement `from_module` and keep the original forward signature."""

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
        raise NotImplementedError


def take(tensor: torch.Tensor, device: torch.device | None) -> nn.Parameter:
    """Wrap `tensor` as a frozen parameter on `device` (meta tensors stay on meta until loaded)."""
    if device is not None and not tensor.is_meta:
        tensor = tensor.to(device)
    return nn.Parameter(tensor.detach(), requires_grad=False)
