"""Helpers for `torch.compile` shared by the engine and operators."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any


def own_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with a code object of its own. Dynamo keeps compiled graphs per code object, at most 8
    (then a fullgraph compile fails, others silently run eagerly), so callers that compile one
    function for many models or weight shapes give each its own copy."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
