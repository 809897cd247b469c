"""Turn measured samples into the benchmark's numbers, a plain-text table and a JSON file.

Each number is the median over the rounds. Ratios are ktinject / baseline for every metric, so
above 1 is better for throughput (tok/s) and below 1 is better for times and memory.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ktinject.bench.systems import KTINJECT

if TYPE_CHECKING:
    from ktinject.bench.runner import Record
    from ktinject.bench.systems import Sample

GIB = 1 << 30

# (key, label, format); labels with {short}/{long} name the context length
ROWS: list[tuple[str, str, str]] = [
    ("prefill_tok_s", "prefill tok/s @{short}", "{:,.1f}"),
    ("ttft_ms", "time to first token ms @{short}", "{:,.1f}"),
    ("decode_tok_s", "decode tok/s @{short}", "{:,.2f}"),
    ("long_prefill_tok_s", "prefill tok/s @{long}", "{:,.1f}"),
    ("long_ttft_ms", "time to first token ms @{long}", "{:,.1f}"),
    ("long_decode_tok_s", "decode tok/s @{long}", "{:,.2f}"),
    ("first_call_s", "first call s (warm-up, compile, capture)", "{:,.2f}"),
    ("steady_call_s", "later calls s (median)", "{:,.2f}"),
    ("peak_memory_gib", "peak memory GiB", "{:,.3f}"),
]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build(
    *,
    machine: dict[str, Any],
    model: dict[str, Any],
    settings: dict[str, Any],
    records: dict[str, Record],
) -> dict[str, Any]:
    """The whole result as one JSON-ready dict."""
    baselines = [name for name in settings["baselines"] if name in records]
    first = baselines[0] if baselines else None
    systems = {
        name: _system(record, settings, records[first] if first and name != first else None)
        for name, record in records.items()
    }
    ratios = {
        f"{KTINJECT}/{name}": _ratios(systems[KTINJECT]["metrics"], systems[name]["metrics"])
        for name in baselines
        if KTINJECT in systems
    }
    return {
        "machine": machine,
        "model": model,
        "settings": settings,
        "reference": first,
        "systems": systems,
        "ratios": ratios,
    }


def _system(record: Record, settings: dict[str, Any], reference: Record | None) -> dict[str, Any]:
    peak = _peak_bytes(record)
    metrics = _rates(record, settings, statistics.median)
    metrics["ttft_ms"] = _median([s.ttft_s * 1000 for s in record.short])
    metrics["long_ttft_ms"] = _median([s.ttft_s * 1000 for s in record.long])
    metrics["first_call_s"] = record.first.total_s if record.first else None
    metrics["steady_call_s"] = _median([s.total_s for s in record.short])
    metrics["peak_memory_gib"] = peak / GIB if peak is not None else None
    result: dict[str, Any] = {
        "metrics": metrics,
        # on a shared machine the fastest round is the least disturbed one
        "best": _rates(record, settings, max),
        "weights_bytes": record.weights_bytes,
        "peak_memory_bytes": peak,
        "tokens": {"short": _tokens(record.short), "long": _tokens(record.long)},
        "samples": {
            context: [{"ttft_s": s.ttft_s, "total_s": s.total_s} for s in samples]
            for context, samples in (("short", record.short), ("long", record.long))
        },
        "error": record.error,
    }
    if record.capture_s is not None:
        result["capture_s"] = record.capture_s
    if record.decode_graphs is not None:
        result["decode_graphs"] = record.decode_graphs
    if record.decode_path is not None:
        result["decode_path"] = record.decode_path
    if reference is not None:
        result["matches_reference"] = {
            context: _match(_tokens(getattr(record, context)), _tokens(getattr(reference, context)))
            for context in ("short", "long")
        }
    return result


def _rates(
    record: Record, settings: dict[str, Any], pick: Callable[[list[float]], float]
) -> dict[str, float | None]:
    """Prefill and decode tok/s at both contexts, `pick`ed over the rounds."""
    rates: dict[str, float | None] = {}
    sequences = settings.get("batch", 1)  # each rate counts the tokens of all of them
    for prefix, samples, length in (
        ("", record.short, settings["prompt_len"]),
        ("long_", record.long, settings["long_context"]),
    ):
        prefill = [sequences * length / s.ttft_s for s in samples]
        new_tokens = sequences * (settings["new_tokens"] - 1)
        decode = [new_tokens / s.decode_s for s in samples if s.decode_s > 0]
        rates[f"{prefix}prefill_tok_s"] = pick(prefill) if prefill else None
        rates[f"{prefix}decode_tok_s"] = pick(decode) if decode else None
    return rates


def _peak_bytes(record: Record) -> int | None:
    """Weights + the most held at once: during the first call (which allocates whatever the
    system keeps: caches, graphs), or during a later call on top of what the first call kept."""
    if not record.windows:
        return None
    first, *later = record.windows
    extra = max([first.transient, *(max(first.growth, 0) + w.transient for w in later)])
    return record.weights_bytes + max(extra, 0)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _tokens(samples: list[Sample]) -> list[int] | None:
    return samples[0].tokens if samples else None


def _match(tokens: list[int] | None, reference: list[int] | None) -> dict[str, Any] | None:
    """Whether greedy tokens equal the reference's, and the first index where they differ."""
    if tokens is None or reference is None:
        return None
    differ = [i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b]
    if len(tokens) != len(reference) and not differ:
        differ = [min(len(tokens), len(reference))]
    return {"equal": not differ, "first_mismatch": differ[0] if differ else None}


def _ratios(ours: dict[str, float | None], theirs: dict[str, float | None]) -> dict[str, Any]:
    return {
        key: ours[key] / theirs[key] if ours.get(key) and theirs.get(key) else None for key in ours
    }


def table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per metric, one column per system, then the ratios."""
    settings, machine = result["settings"], result["machine"]
    names = list(result["systems"])
    ratio_names = list(result["ratios"])
    header = ["metric", *names, *ratio_names]
    contexts = {"short": settings["prompt_len"], "long": settings["long_context"]}
    rows = []
    for key, label, fmt in ROWS:
        if key.startswith("long_") and not settings["long_context"]:
            continue
        cells = [_cell(result["systems"][name]["metrics"].get(key), fmt) for name in names]
        ratios = [_cell(result["ratios"][name].get(key), "{:.2f}x") for name in ratio_names]
        rows.append([label.format(**contexts), *cells, *ratios])
    reference = result["reference"]
    for context, length in contexts.items():
        if not length or reference is None:
            continue
        cells = []
        for name in names:
            match = result["systems"][name].get("matches_reference", {}).get(context)
            cells.append("ref" if name == reference else _match_cell(match))
        rows.append([f"tokens equal {reference} @{length}", *cells, *[""] * len(ratio_names)])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"ktinject bench · {result['model']['label']} · {settings['dtype']} on "
        f"{machine.get('gpu') or _cpu(machine)} ({settings['device']}, "
        f"{settings['threads']} threads) · {machine['date']}",
        f"{_batch(settings)}new tokens {settings['new_tokens']} · "
        f"cache {settings['cache_lens']} positions · "
        f"medians of {settings['repeats']} round(s) · memory: {settings['memory']}",
    ]
    if settings["interrupted"]:
        lines.append("note: interrupted (SIGTERM or Ctrl-C); the numbers are what was measured")
    if not settings["interleaved"]:
        lines.append("note: two model copies did not fit; baselines ran first, then ktinject")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    for name, system in result["systems"].items():
        for key in ("decode_graphs", "decode_path"):
            if system.get(key):
                lines.append(f"{name} {key.replace('_', ' ')}: {system[key]}")
        if system["error"]:
            lines.append(f"error in {name}: {system['error']}")
    return "\n".join(lines)


def _batch(settings: dict[str, Any]) -> str:
    batch = settings.get("batch", 1)
    return f"batch {batch} (rates count all sequences) · " if batch > 1 else ""


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _match_cell(match: dict[str, Any] | None) -> str:
    if match is None:
        return "-"
    return "yes" if match["equal"] else f"no (from #{match['first_mismatch']})"


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def _cpu(machine: dict[str, Any]) -> str:
    """The CPU's name and vector instructions (JSON written before they were recorded: name)."""
    capability = machine.get("cpu_capability")
    return f"{machine['cpu']} {capability}" if capability else machine["cpu"]
