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
from dataclasses import dataclass
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


class RandomModels:
    """A named shape with seeded random weights (see `ktinject.bench.shapes`)."""

    def __init__(
        self, shape: str, device: torch.device, dtype: torch.dtype, rules: str | None, seed: int
    ) -> None:
        from ktinject.bench.shapes import SHAPES, random_model

        self._baseline: nn.Module | None = random_model(shape, device, dtype, seed=seed)
        self.label = f"{shape} (random weights, {SHAPES[shape].note})"
        self.config = self._baseline.config
        self.rules = rules_for(self.config.model_type) if rules == "auto" else rules

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
        self, source: str | None, device: torch.device, dtype: torch.dtype, rules: str | None
    ) -> None:
        self.source, self.device, self.dtype = source, device, dtype
        self._baseline: nn.Module | None = self._load(None).model
        self.config = self._baseline.config
        self.label = str(Path(source)) if source else "embedded SmolLM2-135M-Instruct"
        self.rules = rules_for(self.config.model_type) if rules == "auto" else rules

    def baseline(self) -> nn.Module:
        return self._baseline

    def patched(self, *, in_place: bool) -> Patched:
        if in_place:
            self._baseline = None  # frees the baseline before the second copy is read
            free_memory(self.device)
        loaded = self._load(self.rules)
        return Patched(loaded.model, loaded.report)

    def _load(self, rules: str | Path | None) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unmatched rules are listed in the report
            return load(
                self.source, rules=rules, device=self.device, dtype=self.dtype, progress=False
            )


def _optimize(model: nn.Module, rules: str | Path | None) -> Patched:
    if rules is None:
        return Patched(model, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmatched rules are listed in the report
        model, report = optimize(model, rules)
    return Patched(model, report)


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
