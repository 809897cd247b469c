"""Operators from outside the allow-listed packages, for the rule and injection tests.

Importable as `external_operators.<Name>` (conftest.py puts tests/ on sys.path), which is exactly
what a user's own operator package looks like to the allow-list.
"""

from __future__ import annotations

import torch
from torch import nn


class ScaleBy(nn.Module):
    """A plain nn.Module (no from_module): built as `ScaleBy(**kwargs)`."""

    def __init__(self, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Wrapped(nn.Module):
    """An operator that keeps the module it replaces as a child."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @classmethod
    def from_module(cls, module: nn.Module, **_: object) -> Wrapped:
        return cls(module)

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.inner(*args, **kwargs)
