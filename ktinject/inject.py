"""Apply a rule set to a model: match modules, build operators, place them on their devices.

`optimize(model, rules)` is the public entry. It works on a loaded model (operators are built from
real weights and moved at once) and on a model whose parameters are still on the meta device
(operators are built on meta; `place()` moves everything once the weights are loaded).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ktinject.errors import KtinjectError, RuleError, UnmatchedRuleError
from ktinject.placement import align_devices, module_device
from ktinject.rules import Rule, RuleSet, load_rules, rules_for

OPTIMIZED = "_ktinject_rules"  # set on a model optimize replaced modules of: its rule sources


class UnmatchedRuleWarning(UserWarning):
    """A rule matched no module (an error under strict mode)."""


@dataclass(frozen=True)
class Replacement:
    """One module a rule acted on."""

    name: str
    rule: str
    original: str
    operator: str
    device: str
    pinned: bool


@dataclass
class InjectionReport:
    """What `optimize` did: every module a rule acted on, and the rules that matched nothing."""

    replacements: list[Replacement] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(r.name, r.rule, r.original, r.operator, r.device) for r in self.replacements]


def optimize(
    model: nn.Module,
    rules: str | Path | Sequence[Any] | Mapping[str, Any] | RuleSet | None,
    *,
    strict: bool = False,
    allow_external_operators: bool = False,
    **overrides: Any,
) -> tuple[nn.Module, InjectionReport]:
    """Replace the modules of `model` that `rules` match, in place, and report what happened.

    `rules` is a rule file path or shipped name (`"llama"`), `"auto"` (the shipped file for the
    model's `config.model_type`, as `ktinject.loading.load` picks it; none: no rules), an
    in-memory rule document, a `RuleSet` or None. Keyword `overrides` set the rule file's
    `vars:` (e.g. `gpu="cuda:1"`). Per module the first matching rule wins; rules that match
    nothing are reported, and raise `UnmatchedRuleError` when `strict` is set. A model is
    optimized once: its replaced modules no longer match the rules written for the originals.
    """
    if not isinstance(model, nn.Module):
        raise RuleError(f"model is a {type(model).__name__}; optimize takes a torch nn.Module.")
    config = getattr(model, "config", None)
    if isinstance(rules, str) and rules == "auto":
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise RuleError(
                "rules='auto' picks the shipped rule file for model.config.model_type, which "
                "this model lacks; give a rule file or None."
            )
        rules = rules_for(model_type)
    rule_set = load_rules(rules, overrides, allow_external_operators=allow_external_operators)
    if rule_set.rules and getattr(model, OPTIMIZED, None):
        raise RuleError(
            f"The model was already optimized (with {', '.join(getattr(model, OPTIMIZED))}), "
            "so its modules are operators now; apply all rules in one optimize call (a rule "
            "file can extend another) to a freshly loaded model."
        )
    report = InjectionReport(notes=list(rule_set.notes), sources=list(rule_set.sources))
    used: set[int] = set()
    _visit(model, "", rule_set.rules, config, report, used)
    unmatched = [rule for i, rule in enumerate(rule_set.rules) if i not in used]
    report.unmatched = [rule.where for rule in unmatched]
    if unmatched:
        listed = "; ".join(_describe(rule) for rule in unmatched)
        if strict:
            raise UnmatchedRuleError(
                f"{len(unmatched)} rule(s) matched no module: {listed}; fix the pattern or drop "
                f"--strict."
            )
        warnings.warn(
            f"Rules that matched no module: {listed}.", UnmatchedRuleWarning, stacklevel=2
        )
    if report.replacements:
        setattr(model, OPTIMIZED, report.sources)
    _align(model, report)
    return model, report


def _align(model: nn.Module, report: InjectionReport) -> None:
    """Let modules placed on different devices pass tensors (`ktinject.placement`), and say so."""
    moves = align_devices(model)
    if moves:
        devices = ", ".join(sorted({str(move.device) for move in moves}))
        report.notes.append(
            f"modules run on {devices}: inputs move to {len(moves)} modules' devices "
            f"(first: {moves[0].name}); decode runs without CUDA graphs"
        )


def _describe(rule: Rule) -> str:
    what = []
    if rule.name_pattern is not None:
        what.append(f"name {rule.name_pattern.pattern!r}")
    if rule.match_class is not None:
        what.append(f"class {rule.match_class!r}")
    return f"{rule.where} ({', '.join(what)})"


def _visit(
    parent: nn.Module,
    prefix: str,
    rules: list[Rule],
    config: Any,
    report: InjectionReport,
    used: set[int],
    acted_on: dict[int, nn.Module] | None = None,
) -> None:
    """Replace matching children of `parent`, depth first. `acted_on` holds the modules a rule
    already handled, so an operator that keeps its original module as a child is not matched
    (and wrapped) again by the same rule when recursing. It keeps them alive too: an id is only
    unique while its object lives, and a module built during the walk could otherwise take the
    id of a replaced one (seen: fused q/k/v linears skipped by the rule meant for them)."""
    acted_on = {} if acted_on is None else acted_on
    for child_name, child in list(parent.named_children()):
        name = f"{prefix}.{child_name}" if prefix else child_name
        if id(child) in acted_on:
            continue
        hits = [i for i, r in enumerate(rules) if r.matches(name, child)]
        # A rule shadowed by an earlier one (e.g. the base rule an `extends` file overrides) did
        # match: only rules that match no visited module are reported as unmatched.
        used.update(hits)
        if not hits:
            _visit(child, name, rules, config, report, used, acted_on)
            continue
        rule = rules[hits[0]]
        new = _build(rule, child, name, config)
        acted_on.update({id(child): child, id(new): new})
        if new is not child:
            setattr(parent, child_name, new)
        report.replacements.append(
            Replacement(
                name=name,
                rule=rule.label,
                original=type(child).__name__,
                operator=type(new).__name__ if rule.operator is not None else "default",
                device=_device_label(rule.device or module_device(new)),
                pinned=rule.device is not None,
            )
        )
        if rule.recursive:
            _visit(new, name, rules, config, report, used, acted_on)


def _build(rule: Rule, module: nn.Module, name: str, config: Any) -> nn.Module:
    """Construct the rule's operator from `module` and move it to the rule's device. 'meta'
    only suits a model built on meta (`ktinject.loading.plan`): loaded weights moved there are
    gone."""
    if rule.device is not None and rule.device.type == "meta" and not is_meta(module):
        raise RuleError(
            f"{rule.where}: device 'meta' would drop the loaded weights of {name} (meta holds "
            "shapes only); use 'cpu', 'cuda' or 'cuda:N' (replace.device)."
        )
    target = rule.device or module_device(module)
    if rule.operator is None:
        new = module
    else:
        try:
            if hasattr(rule.operator, "from_module"):
                new = rule.operator.from_module(
                    module, name=name, config=config, device=target, **rule.kwargs
                )
            else:
                new = rule.operator(**rule.kwargs)
        except KtinjectError as exc:
            raise RuleError(f"{rule.where}: cannot replace {name}: {exc}") from None
        except (TypeError, ValueError, AttributeError, KeyError, RuntimeError) as exc:
            raise RuleError(
                f"{rule.where}: {rule.replace_class} cannot be built from {name} "
                f"({type(module).__name__}): {exc}; check replace.class and replace.kwargs."
            ) from None
    if rule.device is not None and not is_meta(new):
        new.to(rule.device)
    return new


def _device_label(device: torch.device | None) -> str:
    return "-" if device is None or device.type == "meta" else str(device)


def is_meta(module: nn.Module) -> bool:
    """Whether any weight of `module` still waits for the checkpoint (some operators keep theirs
    as buffers, e.g. packed blocks)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def place(model: nn.Module, report: InjectionReport, default: torch.device) -> nn.Module:
    """Move every parameter and buffer to its device: the device its nearest replaced ancestor was
    pinned to by a rule, else `default`. Tied parameters stay tied (each is moved once). The
    report's devices are updated to where modules ended up."""
    targets = {r.name: torch.device(r.device) for r in report.replacements if r.pinned}
    moved: dict[
        int, tuple[nn.Parameter, nn.Parameter]
    ] = {}  # keeps the old one alive: ids stay unique
    for name, module in model.named_modules():
        device = _nearest_target(name, targets, default)
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in moved:
                moved[id(param)] = (param, nn.Parameter(param.data.to(device), requires_grad=False))
            module._parameters[key] = moved[id(param)][1]
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    report.replacements = [
        dataclasses.replace(r, device=_device_label(module_device(model.get_submodule(r.name))))
        for r in report.replacements
    ]
    _align(model, report)
    return model


def _nearest_target(
    name: str, targets: dict[str, torch.device], default: torch.device
) -> torch.device:
    while True:
        if name in targets:
            return targets[name]
        if not name:
            return default
        name = name.rpartition(".")[0]
