"""The operator contract shared by every operator family."""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import nn


class Operator(nn.Module):
    """Base class: subclasses implement `from_module` and keep the original forward signature.

    `not_capturable`: why a decode step containing this operator can be neither captured in a
    CUDA graph nor compiled as one graph (e.g. it reads device values on the host); the engine
    then decodes eagerly and says why. None: it can be.

    `places_inputs`: the operator takes inputs from any device and returns its output on theirs
    itself, so `ktinject.placement` installs no device hook on it.

    `memory_grows_with_rows`: a captured step of this operator holds memory per row beyond its
    activations (e.g. copies of each row's weights), so the engine never replays a prefill chunk
    as a decode step of many rows (`Engine._prefill_rows`) in a model that has it."""

    not_capturable: str | None = None
    places_inputs: bool = False
    memory_grows_with_rows: bool = False

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


def beside(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a fused kernel may read `weight` with the activations `x`: same dtype, same
    device (a rule may have placed the module holding it elsewhere)."""
    return weight.dtype == x.dtype and weight.device == x.device


def check_source(
    operator: type, module: nn.Module, kwargs: dict[str, Any], parts: tuple[str, ...]
) -> None:
    """The checks every `from_module` starts with: no unexpected kwargs, and the attributes the
    operator takes from `module` exist. A TypeError here becomes a one-line RuleError naming the
    rule (see ktinject.inject)."""
    if kwargs:
        raise TypeError(f"{operator.__name__} takes no kwargs, got {sorted(kwargs)}")
    missing = [part for part in parts if not hasattr(module, part)]
    if missing:
        raise TypeError(f"{type(module).__name__} has no {', '.join(missing)}")


def concat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack weights along dim 0 for a fused projection; on meta, only the shape is made (the
    real rows arrive through the operator's load-state-dict hook)."""
    if tensors[0].is_meta:
        rows = sum(t.shape[0] for t in tensors)
        return torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype, device="meta")
    return torch.cat([t.detach() for t in tensors], dim=0)


def fused_linear(parts: list[nn.Linear], device: torch.device | None) -> nn.Linear:
    """One `nn.Linear` computing `parts` side by side (their rows stacked), e.g. q/k/v. A plain
    child module, so a rule can still replace it (say, with a block-quantized linear)."""
    weight = concat_rows([part.weight for part in parts])
    has_bias = parts[0].bias is not None
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    layer.weight = take(weight, device)
    if has_bias:
        layer.bias = take(concat_rows([part.bias for part in parts]), device)
    return layer


def fuse_keys_on_load(module: nn.Module, sources: tuple[str, ...], target: str) -> None:
    """Let `module` load checkpoints written for the module it replaced: the `<source>.weight` /
    `.bias` keys are concatenated (in order) into its `<target>.weight` / `<target>.bias`."""

    def hook(_: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{source}.{kind}" for source in sources]
            if all(key in state_dict for key in keys):
                fused = torch.cat([state_dict.pop(key) for key in keys])
                state_dict[f"{prefix}{target}.{kind}"] = fused

    module.register_load_state_dict_pre_hook(hook)


def take(tensor: torch.Tensor, device: torch.device | None) -> nn.Parameter:
    """Wrap `tensor` as a frozen parameter on `device` (meta tensors stay on meta until loaded)."""
    if device is not None and not tensor.is_meta:
        tensor = tensor.to(device)
    return nn.Parameter(tensor.detach(), requires_grad=False)
