"""The systems a benchmark compares, behind one call: `run(prompt, n) -> Sample`.

- `HFEager`: `model.generate` with Hugging Face's default DynamicCache, greedy.
- `HFStaticCompile`: `model.generate` with one reused `StaticCache` of the same size as ktinject's
  cache; transformers then compiles the decode step itself (its documented path: a compileable
  cache triggers `torch.compile` with the default `CompileConfig`, mode "reduce-overhead", i.e.
  CUDA graphs). Prefill stays eager, as in transformers.
- `Ktinject`: the patched model driven by `Engine.prefill` / `Engine.decode_sampled` (the loop
  `Engine.generate` runs).

`generate` cannot tell when its first token was ready, so an HF run is two calls: one with
`max_new_tokens=1` (time to first token) and one with n (the whole generation); decode time is the
difference. Every system suppresses end-of-sequence tokens for all n steps (HF: `min_new_tokens=n`;
ktinject: the same ids masked before argmax), so each run yields exactly n comparable tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ktinject.bench.measure import Stopwatch

HF_EAGER = "hf-eager"
HF_STATIC_COMPILE = "hf-static-compile"
KTINJECT = "ktinject"
BASELINES = {"eager": HF_EAGER, "static-compile": HF_STATIC_COMPILE}


@dataclass
class Sample:
    """One greedy generation of n tokens from one prompt."""

    ttft_s: float  # prompt in, first token chosen
    total_s: float  # prompt in, n tokens chosen
    tokens: list[int]

    @property
    def decode_s(self) -> float:
        return self.total_s - self.ttft_s


class HFEager:
    name = HF_EAGER

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.watch = Stopwatch(device)
        self.pad = _pad_token(model)

    def run(self, prompt: torch.Tensor, n: int) -> Sample:
        # the whole generation first, so a system's first run times its first full call
        total_s, tokens = self._generate(prompt, n)
        ttft_s, _ = self._generate(prompt, 1)
        return Sample(ttft_s=ttft_s, total_s=total_s, tokens=tokens)

    def _generate(self, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
        kwargs = self._kwargs()
        self.watch.start()
        out = self.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=self.pad,
            **kwargs,
        )
        seconds = self.watch.stop()
        return seconds, out[:, prompt.shape[1] :].flatten().tolist()  # row after row

    def _kwargs(self) -> dict[str, Any]:
        return {}


class HFStaticCompile(HFEager):
    name = HF_STATIC_COMPILE

    def __init__(self, model: nn.Module, device: torch.device, cache_lens: int) -> None:
        from transformers import CompileConfig, StaticCache

        super().__init__(model, device)
        self.cache = StaticCache(config=model.config, max_cache_len=cache_lens)
        self.compile_config = CompileConfig()
        # transformers compiles only on accelerators unless told otherwise
        self.compile_config._compile_all_devices = device.type != "cuda"

    def _kwargs(self) -> dict[str, Any]:
        self.cache.reset()
        return {"past_key_values": self.cache, "compile_config": self.compile_config}


class Ktinject:
    name = KTINJECT

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        cache_lens: int,
        cuda_graph: bool,
        compile: bool = False,  # noqa: A002 - the --compile flag
    ) -> None:
        self.model = model
        self.cache_lens = cache_lens
        self.cuda_graph = cuda_graph
        self.compile = compile
        self.watch = Stopwatch(device)
        self.engine: Any = None
        eos = _eos_ids(model)
        self.eos = torch.tensor(eos, device=device, dtype=torch.long) if eos else None

    @property
    def capture_s(self) -> float:
        """CUDA-graph capture, or torch.compile time of the CPU decode step."""
        return self.engine.setup_s if self.engine is not None else 0.0

    @property
    def decode_graphs(self) -> str | None:
        """Which captured decode step the engine kept per batch size (it times both)."""
        choice = self.engine.fused_gemv_choice if self.engine is not None else {}
        paths = {True: "fused Triton projections and attention", False: "separate kernels"}
        return ", ".join(f"batch {b}: {paths[fused]}" for b, fused in choice.items()) or None

    @property
    def decode_path(self) -> str | None:
        """How the engine decodes on a CPU: one compiled graph, or eagerly with how many decoder
        layers as one C++ call each (`operators.layer`)."""
        engine = self.engine
        if engine is None or engine.device.type != "cpu" or not engine.static:
            return None
        if engine.compiled is not None:
            return "one torch.compile graph a step"
        layers = getattr(engine.model.config, "num_hidden_layers", "?")
        return f"eager, {engine.native_layers} of {layers} decoder layers in one C++ call each"

    def run(self, prompt: torch.Tensor, n: int) -> Sample:
        """Prompt [B, P]: each row prefilled into its own slot, then all rows decoded together,
        as the server batches requests. Tokens are returned row after row."""
        from ktinject.engine import Engine

        rows = prompt.tolist()
        slots = list(range(len(rows)))
        self.watch.start()
        if self.engine is None:  # created in the first run: its cache counts as warm-up memory
            self.engine = Engine(
                self.model,
                cache_lens=self.cache_lens,
                num_slots=len(rows),
                cuda_graph=self.cuda_graph,
                compile=self.compile,
            )
            # as `serve` does: every kernel variant and graph, so no later run compiles (on a
            # GPU the first run's short prompt replays a graph, and a long prompt's eager
            # prefill would otherwise compile inside a timed round)
            self.engine.warm_up()
        last = [self.engine.prefill(slot, ids, reuse=False)[0] for slot, ids in enumerate(rows)]
        sampled = self._greedy(torch.stack(last))
        sampled[-1].item()
        ttft_s = self.watch.stop()
        self.watch.start()
        steps = []  # like Engine.generate: each id is read while the step fed with it runs
        for _ in range(n - 1):
            logits, fed = self.engine.decode_sampled(slots, sampled)
            steps.append(fed)
            sampled = self._greedy(logits)
        steps.append(sampled.tolist())
        decode_s = self.watch.stop()
        tokens = [step[row] for row in slots for step in steps]
        return Sample(ttft_s=ttft_s, total_s=ttft_s + decode_s, tokens=tokens)

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax of logits [B, V], eos masked like `generate(min_new_tokens=...)`; stays on
        the device as [B]."""
        if self.eos is not None:
            logits = logits.index_fill(-1, self.eos, float("-inf"))
        return logits.argmax(dim=-1)


def _eos_ids(model: nn.Module) -> list[int]:
    """The ids `generate(min_new_tokens=...)` masks: the generation config's eos ids."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _pad_token(model: nn.Module) -> int:
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = _eos_ids(model)
        pad = eos[0] if eos else 0
    return int(pad)
