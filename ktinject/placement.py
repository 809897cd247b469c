"""Modules that rules place on different devices work together: inputs follow the module.

A rule may pin any module to a device (`replace.device`): the second half of a model's layers
on a second GPU (`rules/llama-2gpu.yaml`), or a norm on the CPU. Hugging Face's forward code then
hands each module tensors from wherever the previous one left them, and torch refuses to mix
devices. `align_devices` plans where inputs must move once placement is known and installs
accelerate's `AlignDevicesHook` (the mechanism of `device_map=` in transformers) on just those
modules:

* **blocks** run one after another (the decoder layers, and the modules around them: embedding,
  rotary embedding, final norm, head): each takes its inputs onto its own device and leaves its
  output there for the next one, so the hidden state crosses a device boundary once;
* any other module on a device other than its parent's also takes its inputs onto its device,
  and gives its output back where the inputs came from (the parent continues there).

Operators that move their own inputs (`Operator.places_inputs`, e.g. `CPUExperts`) are left
alone. A model on one device gets no hooks at all. The attention operators find their cache
bookkeeping on their own device through `current_context(device)`; the engine brings the logits
back to the embedding's device and decodes such a model without CUDA graphs (a graph captures
one device's work).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
from torch import nn

SKIP_KEYS = ["past_key_values"]  # Hugging Face's cache object stays where it is


@dataclass(frozen=True)
class Move:
    """Inputs of module `name` go to `device`; `returns`: its output goes back afterwards."""

    name: str
    device: torch.device
    returns: bool


class InputsFollow(AlignDevicesHook):
    """accelerate's hook under a name of ours, so `align_devices` removes only its own."""


def module_device(module: nn.Module) -> torch.device | None:
    """Device of the module's first parameter or buffer (None for a stateless module)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def model_devices(model: nn.Module) -> set[torch.device]:
    """Every device holding a parameter or buffer of `model`."""
    return {t.device for t in (*model.parameters(), *model.buffers())}


def blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The modules a causal LM's forward runs one after another: the children of the model and
    of its base model, with the base model's layer lists expanded into their layers."""
    base = getattr(model, "base_model", None)
    base = base if isinstance(base, nn.Module) and base is not model else None
    for parent in (model, base):
        if parent is None:
            continue
        for child in parent.children():
            if child is base:
                continue
            if isinstance(child, nn.ModuleList) and parent is base:
                yield from child
            else:
                yield child


def plan_moves(
    model: nn.Module, device_of: Callable[[nn.Module], torch.device | None] = module_device
) -> list[Move]:
    """Where inputs must move for `model` as placed (`device_of` tells a module's device; tests
    pass their own). Empty for a model on one device."""
    if len({device_of(m) for m in model.modules()} - {None}) < 2:
        return []
    sequence = {id(m) for m in blocks(model)}
    moves: list[Move] = []

    def visit(module: nn.Module, prefix: str, parent_device: torch.device) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            device = device_of(child) or parent_device
            if getattr(child, "places_inputs", False):
                continue
            if isinstance(child, nn.ModuleList | nn.ModuleDict):  # containers run no forward
                pass
            elif id(child) in sequence:
                moves.append(Move(name, device, returns=False))
            elif device != parent_device:
                moves.append(Move(name, device, returns=True))
            visit(child, name, device)

    visit(model, "", device_of(model))
    return moves


def align_devices(model: nn.Module) -> list[Move]:
    """Install (or, after placement changed, replace) the hooks `plan_moves` asks for; returns
    the plan. Models still on the meta device are left for `ktinject.inject.place`."""
    for module in model.modules():
        if isinstance(getattr(module, "_hf_hook", None), InputsFollow):
            remove_hook_from_module(module)
    if any(device.type == "meta" for device in model_devices(model)):
        return []
    moves = plan_moves(model)
    for move in moves:
        hook = InputsFollow(move.device, io_same_device=move.returns, skip_keys=SKIP_KEYS)
        add_hook_to_module(model.get_submodule(move.name), hook)
    return moves
