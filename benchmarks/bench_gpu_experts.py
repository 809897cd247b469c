"""One MoE layer's experts for a decode step on a GPU: Hugging Face's experts module (eager loop)
vs `GatheredExperts`' two graph-safe paths, torch's gathered copies (the plain decode graph) and
the in-place Triton kernels (the fused decode graph, `operators/triton/experts.py`), in the same
process on the same weights.

The shape defaults to one Qwen3-30B-A3B layer (128 experts, hidden 2048, expert width 768,
top-8) in bf16. The graph-safe paths are captured in a CUDA graph per token count and replayed,
as the engine runs them; HF's loop reads the routing on the host and runs eagerly. Each round
times every system once per token count (CUDA events over `--calls` calls), alternating their
order; the table shows the median us per call, the ratio to HF, the bandwidth the selected
experts' weights were read at, and the largest difference from HF's output.

    python benchmarks/bench_gpu_experts.py --out bench-out/gpu-experts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.bench_cpu_experts import (  # noqa: E402
    add_layer_arguments,
    hf_experts,
    routed_batch,
)
from ktinject.bench.measure import machine  # noqa: E402
from operators.experts import GatheredExperts  # noqa: E402
from operators.triton.gemv import prefer_fused_gemv  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_arguments(parser)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed round")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def captured(call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`call` captured in a CUDA graph (after two warm-up runs on a side stream); returns the
    replay, which leaves its result in the same output tensor every time."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def us_per_call(call: Callable[[], Any], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    call()
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / calls


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    hf = hf_experts(args, dtype).to(device)
    gathered = GatheredExperts.from_module(hf, name="experts", config=None, device=device)
    generator = torch.Generator().manual_seed(1)
    token_counts = [int(n) for n in args.tokens.split(",")]
    calls: dict[tuple[str, int], Callable[[], torch.Tensor]] = {}
    error: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for n in token_counts:
            batch = tuple(t.to(device) for t in routed_batch(args, n, generator, dtype))
            calls["hf", n] = lambda batch=batch: hf(*batch)
            for name, in_place in (("gathered-copies", False), ("gathered-in-place", True)):
                with prefer_fused_gemv(in_place):
                    calls[name, n] = captured(lambda batch=batch: gathered(*batch))
            expected = hf(*batch).float()
            for name in ("hf", "gathered-copies", "gathered-in-place"):
                diff = (calls[name, n]().float() - expected).abs().max().item()
                error[name, n] = diff / expected.abs().max().item()
        systems = ["hf", "gathered-copies", "gathered-in-place"]
        times: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
        for round_ in range(args.repeats):
            for name in systems if round_ % 2 == 0 else reversed(systems):
                for n in token_counts:
                    times[name, n].append(us_per_call(calls[name, n], args.calls))

    element = torch.finfo(dtype).bits // 8
    one_expert = 3 * args.hidden * args.width * element  # gate, up and down rows
    rows: list[dict[str, Any]] = []
    for n in token_counts:
        base = statistics.median(times["hf", n])
        distinct = min(args.experts, n * args.top_k)  # at most; tokens may share experts
        for name in systems:
            us = statistics.median(times[name, n])
            rows.append(
                {
                    "system": name,
                    "tokens": n,
                    "us_per_call": us,
                    "speedup_vs_hf": base / us,
                    "selected_expert_gb_per_s": distinct * one_expert / us / 1e3,
                    "max_rel_diff_vs_hf": error[name, n],
                }
            )
    print(f"\n{args.experts} experts, hidden {args.hidden}, width {args.width}, top-{args.top_k}, ")
    print(f"{args.dtype}, {torch.cuda.get_device_name(device)}, median of {args.repeats} rounds\n")
    print("| system | tokens | us per call | vs HF | selected experts read at | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['system']} | {row['tokens']} | {row['us_per_call']:.1f} | "
            f"{row['speedup_vs_hf']:.2f}x | {row['selected_expert_gb_per_s']:.0f} GB/s | "
            f"{row['max_rel_diff_vs_hf']:.1e} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine(device), "args": vars(args) | {"out": str(args.out)}}
        args.out.write_text(json.dumps(result | {"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
