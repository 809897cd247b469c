"""Run a benchmark: build the models, measure every system, aggregate, report.

Order of work, per group of systems that share the machine at the same time:
1. each system's first call (prompt-len, new-tokens), timed on its own: warm-up, compilation and
   graph capture land here, and its memory window includes every allocation the system keeps;
2. `repeats` rounds, each running every system once at prompt-len and once at long-context,
   alternating the order of systems between rounds so slow drift of the machine's speed hits all
   of them alike; the first round's long run is also a memory window;
3. medians over the rounds.
When two model copies fit (the usual case) there is one group; otherwise the baselines run first,
are freed, and ktinject runs after them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ktinject.bench import report
from ktinject.bench.measure import MemoryProbe, Window, free_memory, machine
from ktinject.bench.models import LoadedModels, Patched, RandomModels, RuleChoice, weights_bytes
from ktinject.bench.systems import (
    BASELINES,
    HF_EAGER,
    HFEager,
    HFStaticCompile,
    Ktinject,
    Sample,
)
from ktinject.cache import available_memory, local_cache_lens
from ktinject.cli import overrides_arg, rules_arg
from ktinject.devices import flag_device
from ktinject.errors import KtinjectError
from ktinject.loading import resolve_dtype

SEED = 0
GPU_MARGIN = 4 << 30  # activations, workspaces and allocator slack beside a second copy
CPU_MARGIN = 1 << 30


@dataclass
class Settings:
    """The flags, with device-dependent defaults filled in."""

    device: torch.device
    dtype: torch.dtype
    prompt_len: int
    long_context: int
    new_tokens: int
    repeats: int
    batch: int
    baselines: list[str]
    cuda_graph: bool
    compile: bool
    threads: int | None

    @property
    def cache_lens(self) -> int:
        """One cache size for every system and both contexts, as a server would allocate."""
        return local_cache_lens(max(self.prompt_len, self.long_context), self.new_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "dtype": report.dtype_name(self.dtype),
            "prompt_len": self.prompt_len,
            "long_context": self.long_context,
            "new_tokens": self.new_tokens,
            "repeats": self.repeats,
            "batch": self.batch,
            "baselines": self.baselines,
            "cache_lens": self.cache_lens,
            "cuda_graph": self.cuda_graph,
            "compile": self.compile,
            "threads": torch.get_num_threads(),
        }


def resolve_settings(args: argparse.Namespace) -> Settings:
    device = flag_device(args.device)
    gpu = device.type == "cuda"
    baselines = args.baselines or ("eager,static-compile" if gpu else "eager")
    names = [name.strip() for name in baselines.split(",") if name.strip()]
    unknown = [name for name in names if name not in BASELINES]
    if unknown or not names:
        raise KtinjectError(
            f"--baselines {baselines!r} is not a list of {', '.join(BASELINES)}; e.g. "
            f"--baselines eager,static-compile."
        )
    settings = Settings(
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        prompt_len=args.prompt_len,
        long_context=(8192 if gpu else 1024) if args.long_context is None else args.long_context,
        new_tokens=(256 if gpu else 64) if args.new_tokens is None else args.new_tokens,
        repeats=args.repeats,
        batch=args.batch,
        baselines=[BASELINES[name] for name in dict.fromkeys(names)],
        cuda_graph=not args.no_cuda_graph,
        compile=args.compile,
        threads=args.threads if args.threads is not None else (None if gpu else 2),
    )
    check_json_path(args.json)
    for flag, value, least in (
        ("--prompt-len", settings.prompt_len, 1),
        ("--long-context", settings.long_context, 0),
        ("--new-tokens", settings.new_tokens, 2),
        ("--repeats", settings.repeats, 1),
        ("--batch", settings.batch, 1),
        ("--threads", 1 if settings.threads is None else settings.threads, 1),  # None: default
    ):
        if value < least:
            raise KtinjectError(f"{flag} is {value}; it must be at least {least}.")
    return settings


def check_json_path(value: str | None) -> None:
    """Refuse a `--json` path that cannot be written before anything is measured, not after."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.is_dir() or value.endswith(("/", os.sep)):
        raise KtinjectError(
            f"--json {value} is a directory; give a file path, e.g. --json {path / 'bench.json'}."
        )
    parent = next((p for p in path.parents if p.exists()), Path("."))  # write_json creates the rest
    if not parent.is_dir():
        raise KtinjectError(
            f"--json {value} cannot be created: {parent} is a file, not a directory; give "
            f"another path."
        )
    writable = os.access(path, os.W_OK) if path.exists() else os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise KtinjectError(
            f"--json {value} cannot be written ({path if path.exists() else parent} is not "
            f"writable); give a path you can write to."
        )


@dataclass
class Record:
    """Everything measured for one system."""

    weights_bytes: int = 0
    first: Sample | None = None
    short: list[Sample] = field(default_factory=list)
    long: list[Sample] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    capture_s: float | None = None
    decode_graphs: str | None = None  # which decode graph the engine kept, if it chose
    decode_path: str | None = None  # on a CPU: compiled, or how many layers run as one call
    error: str | None = None


class Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`) during a run: report what was measured so far."""


def run(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run(args, settings)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_transformers()
    models = _open_models(args, settings)
    limit = getattr(models.config, "max_position_embeddings", None)
    if limit is not None and settings.cache_lens > limit:
        # the cache is sized for the longer of the two contexts: name that one's flag
        flag, length = (
            ("--long-context", settings.long_context)
            if settings.long_context >= settings.prompt_len
            else ("--prompt-len", settings.prompt_len)
        )
        lower = "--new-tokens" if local_cache_lens(1, settings.new_tokens) > limit else flag
        raise KtinjectError(
            f"{flag} {length} with --new-tokens {settings.new_tokens} needs a cache of "
            f"{settings.cache_lens} positions, more than the model's {limit} "
            f"(max_position_embeddings); lower {lower}."
        )
    probe = MemoryProbe(settings.device)
    interleaved = _two_copies_fit(weights_bytes(models.baseline()), settings, models.config)
    records: dict[str, Record] = {}
    patched: Patched | None = None
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        patched = _measure_all(models, settings, probe, interleaved, records)
    except (KeyboardInterrupt, Terminated):
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    injection = patched.report if patched is not None else None
    result = report.build(
        machine=machine(settings.device),
        model={
            "label": models.label,
            "model_type": models.config.model_type,
            "rules": str(models.rules.spec) if models.rules.spec else None,
            "rule_overrides": models.rules.overrides,
            "replaced_modules": len(injection.replacements) if injection else 0,
            "unmatched_rules": injection.unmatched if injection else [],
        },
        settings={
            **settings.as_dict(),
            "interleaved": interleaved,
            "memory": probe.method,
            "interrupted": interrupted,
        },
        records=records,
    )
    print(report.table(result))
    if args.json:
        path = Path(args.json)
        report.write_json(result, path)
        print(f"wrote {path}")
    failed = interrupted or any(record.error for record in records.values())
    return 1 if failed else 0


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _measure_all(
    models: RandomModels | LoadedModels,
    settings: Settings,
    probe: MemoryProbe,
    interleaved: bool,
    records: dict[str, Record],
) -> Patched:
    """Measure every system into `records` (filled as it goes, so an interrupt keeps what was
    measured); return the patched model's description."""
    prompts = _prompts(settings, models.config.vocab_size)
    if interleaved:
        patched = models.patched(in_place=False)
        systems = [*_baselines(models, settings), _ktinject(patched.model, settings)]
        _measure(systems, prompts, settings, probe, records)
        return patched
    _measure(_baselines(models, settings), prompts, settings, probe, records)
    free_memory(settings.device)
    patched = models.patched(in_place=True)
    _measure([_ktinject(patched.model, settings)], prompts, settings, probe, records)
    return patched


def _open_models(args: argparse.Namespace, settings: Settings) -> RandomModels | LoadedModels:
    rules = RuleChoice(rules_arg(args.rules), overrides_arg(args.overrides))
    if args.model:
        source = None if args.model == "embedded" else args.model
        return LoadedModels(source, settings.device, settings.dtype, rules)
    return RandomModels(args.shape or "smollm2-135m", settings.device, settings.dtype, rules, SEED)


def _prompts(settings: Settings, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    lengths = {"short": settings.prompt_len, "long": settings.long_context}
    return {
        name: torch.randint(0, vocab, (settings.batch, length), generator=generator).to(
            settings.device
        )
        for name, length in lengths.items()
        if length > 0
    }


def _two_copies_fit(weights: int, settings: Settings, config: Any) -> bool:
    """Whether a second copy of the weights, the caches of every system and some margin fit."""
    kv = _kv_bytes(config, settings) * (len(settings.baselines) + 1)
    free = available_memory(settings.device)
    margin = GPU_MARGIN if settings.device.type == "cuda" else CPU_MARGIN
    return free is None or weights + kv + margin <= free  # unknown: assume it fits


def _kv_bytes(config: Any, settings: Settings) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=settings.dtype).element_size()
    per_sequence = 2 * config.num_hidden_layers * heads * head_dim * settings.cache_lens * element
    return per_sequence * settings.batch


def _baselines(models: RandomModels | LoadedModels, settings: Settings) -> list[HFEager]:
    model = models.baseline()
    return [
        HFEager(model, settings.device)
        if name == HF_EAGER
        else HFStaticCompile(model, settings.device, settings.cache_lens)
        for name in settings.baselines
    ]


def _ktinject(model: Any, settings: Settings) -> Ktinject:
    return Ktinject(
        model,
        settings.device,
        cache_lens=settings.cache_lens,
        cuda_graph=settings.cuda_graph,
        compile=settings.compile,
    )


def _measure(
    systems: list[Any],
    prompts: dict[str, torch.Tensor],
    settings: Settings,
    probe: MemoryProbe,
    records: dict[str, Record],
) -> None:
    for system in systems:
        records[system.name] = Record(weights_bytes=weights_bytes(system.model))
    memory_context = "long" if "long" in prompts else "short"
    for system in systems:
        record = records[system.name]
        with probe.window() as window:
            record.first = _sample(system, record, prompts["short"], settings)
        record.windows.append(window)
    for round_ in range(settings.repeats):
        for system in systems if round_ % 2 == 0 else systems[::-1]:
            record = records[system.name]
            for context, prompt in prompts.items():
                # memory is sampled in one round only: on CPU the sampler thread costs a little
                watch = round_ == 0 and context == memory_context
                with probe.window() if watch else contextlib.nullcontext() as window:
                    sample = _sample(system, record, prompt, settings)
                if sample is not None:
                    getattr(record, context).append(sample)
                    if watch:
                        record.windows.append(window)


def _sample(system: Any, record: Record, prompt: torch.Tensor, settings: Settings) -> Sample | None:
    """Run one measurement; a failing system is recorded and skipped from then on, so one broken
    baseline (a compile error, an out-of-memory) does not lose the others' numbers."""
    if record.error:
        return None
    try:
        sample = system.run(prompt, settings.new_tokens)
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        record.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        free_memory(settings.device)
        return None
    record.capture_s = getattr(system, "capture_s", None)
    record.decode_graphs = getattr(system, "decode_graphs", None)
    record.decode_path = getattr(system, "decode_path", None)
    return sample


def _quiet_transformers() -> None:
    """Generation-config advisories (sampling flags on greedy runs, ...) are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
