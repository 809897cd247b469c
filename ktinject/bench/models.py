"""The two models a benchmark needs: an untouched Hugging Face model (the baseline) and a
ktinject-patched one with the same weights.

ktinject patches modules in place, so the two must be separate objects: a random-weight shape is
deep-copied before `optimize`, a real model is loaded twice (once without rules). When two copies
do not fit, the runner measures the baseline first, drops it and only then builds the patched model
(`patch_in_place`), so the two are not interleaved.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ktinject.bench.measure import free_memory
from ktinject.inject import InjectionReport, optimize
from ktinject.loading import load, rules_for


@dataclass
class Patched:
    model: nn.Module
    report: InjectionReport | None  # None: no rule file, the model runs unpatched


@dataclass(frozen=True)
class RuleChoice:
    """The ktinject side's rule file (`--rules`: a path, a shipped name, "auto" or None) and
    values for its variables (`--set`)."""

    spec: str | None
    overrides: dict[str, Any] = field(default_factory=dict)

    def resolved(self, model_type: str) -> RuleChoice:
        """ "auto" replaced by the model family's shipped file."""
        return replace(self, spec=rules_for(model_type)) if self.spec == "auto" else self


class RandomModels:
    """A named shape with seeded random weights (see `ktinject.bench.shapes`)."""

    def __init__(
        self, shape: str, device: torch.device, dtype: torch.dtype, rules: RuleChoice, seed: int
    ) -> None:
        from ktinject.bench.shapes import SHAPES, random_model

        self._baseline: nn.Module | None = random_model(shape, device, dtype, seed=seed)
        self.label = f"{shape} (random weights, {SHAPES[shape].note})"
        self.config = self._baseline.config
        self.rules = rules.resolved(self.config.model_type)

    def baseline(self) -> nn.Module:
        return self._baseline

    def patched(self, *, in_place: bool) -> Patched:
        """The patched copy; `in_place` patches the baseline itself (after its runs are done)."""
        model = self._baseline if in_place else copy.deepcopy(self._baseline)
        if in_place:
            self._baseline = None
        return _optimize(model, self.rules)


class LoadedModels:
    """A real model through `ktinject.loading.load` (a directory, a .gguf, or the embedded one)."""

    def __init__(
        self, source: str | None, device: torch.device, dtype: torch.dtype, rules: RuleChoice
    ) -> None:
        self.source, self.device, self.dtype = source, device, dtype
        self._baseline: nn.Module | None = self._load(RuleChoice(None)).model
        self.config = self._baseline.config
        self.label = str(Path(source)) if source else "embedded SmolLM2-135M-Instruct"
        self.rules = rules.resolved(self.config.model_type)

    def baseline(self) -> nn.Module:
        return self._baseline

    def patched(self, *, in_place: bool) -> Patched:
        if in_place:
            self._baseline = None  # frees the baseline before the second copy is read
            free_memory(self.device)
        loaded = self._load(self.rules)
        return Patched(loaded.model, loaded.report)

    def _load(self, rules: RuleChoice) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unmatched rules are listed in the report
            return load(
                self.source,
                rules=rules.spec,
                overrides=rules.overrides,
                device=self.device,
                dtype=self.dtype,
                progress=False,
            )


def _optimize(model: nn.Module, rules: RuleChoice) -> Patched:
    if rules.spec is None:
        return Patched(model, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmatched rules are listed in the report
        model, report = optimize(model, rules.spec, **rules.overrides)
    return Patched(model, report)


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
