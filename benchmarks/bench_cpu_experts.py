"""One MoE layer's experts computed on the CPU: Hugging Face's experts module vs `CPUExperts`
(the checkpoint's dtype, and GGUF blocks Q8_0 / Q4_1) and vs `GatheredExperts` (what the shipped
MoE rule files use), in the same process on the same weights.

The shape defaults to one Qwen3-30B-A3B layer (128 experts, hidden 2048, expert width 768,
top-8), random weights in `--dtype`. Each round calls every system once per token count,
alternating their order; the table shows the median ms per call, the ratio to HF, the bytes of
expert weights each system holds and the largest difference from HF's output (Q8_0 / Q4_1 hold
quantized random weights, so they differ from HF by the formats' rounding; weights that came
from a GGUF of that format would be exact).

    python benchmarks/bench_cpu_experts.py --threads 2 --out bench-out/cpu-experts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import operators.experts  # noqa: E402
from ktinject.bench.measure import machine  # noqa: E402
from operators import native  # noqa: E402
from operators.experts import CPUExperts, GatheredExperts  # noqa: E402


class TorchPath(nn.Module):
    """A block-format `CPUExperts` through the torch path the C kernel replaced (what runs
    without a C compiler), for the same-run comparison."""

    def __init__(self, experts: CPUExperts) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        chosen = operators.experts.native_available
        operators.experts.native_available = lambda: False
        try:
            return self.experts(*args)
        finally:
            operators.experts.native_available = chosen


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """The layer's shape, the decode batches and the dtype (this benchmark's and the GPU one's)."""
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768, help="one expert's intermediate size")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", default="1,8", help="token counts per call (decode batches)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])


def routed_batch(
    args: argparse.Namespace, tokens: int, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, top-k expert ids, routing weights) of `tokens` tokens, each routed to distinct
    random experts as a router would."""
    hidden = torch.randn(tokens, args.hidden, generator=generator).to(dtype)
    index = torch.stack(
        [torch.randperm(args.experts, generator=generator)[: args.top_k] for _ in range(tokens)]
    )
    weights = torch.rand(tokens, args.top_k, generator=generator).softmax(-1).to(dtype)
    return hidden, index, weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_arguments(parser)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def hf_experts(args: argparse.Namespace, dtype: torch.dtype) -> nn.Module:
    """Qwen3-MoE's experts module as transformers builds it, with seeded random weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.width,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    experts = Qwen3MoeExperts(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return experts.to(dtype).requires_grad_(False)


def expert_bytes(module: nn.Module) -> int:
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hf = hf_experts(args, dtype)
    cpu = torch.device("cpu")
    systems: dict[str, nn.Module] = {
        "hf": hf,
        "ktinject-gathered": GatheredExperts.from_module(hf, name="e", config=None, device=cpu),
    }
    for fmt in (None, "q8_0", "q4_1"):
        systems[f"ktinject-{fmt or args.dtype}"] = CPUExperts.from_module(
            hf, name="experts", config=None, device=cpu, format=fmt
        )
        if fmt is not None and native.library() is not None:
            systems[f"ktinject-{fmt}-torch-path"] = TorchPath(systems[f"ktinject-{fmt}"])
    generator = torch.Generator().manual_seed(1)
    token_counts = [int(n) for n in args.tokens.split(",")]
    inputs = {n: routed_batch(args, n, generator, dtype) for n in token_counts}

    times: dict[tuple[str, int], list[float]] = {(s, n): [] for s in systems for n in token_counts}
    error: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for n, batch in inputs.items():  # first calls (compilation of the block kernels)
            expected = hf(*batch).float()
            for name, system in systems.items():
                diff = (system(*batch).float() - expected).abs().max().item()
                error[name, n] = diff / expected.abs().max().item()
        for round_ in range(args.repeats):
            order = list(systems) if round_ % 2 == 0 else list(reversed(systems))
            for name in order:
                for n, batch in inputs.items():
                    started = time.perf_counter()
                    systems[name](*batch)
                    times[name, n].append(time.perf_counter() - started)

    rows: list[dict[str, Any]] = []
    for n in token_counts:
        base = statistics.median(times["hf", n])
        for name, system in systems.items():
            ms = statistics.median(times[name, n]) * 1000
            rows.append(
                {
                    "system": name,
                    "tokens": n,
                    "ms_per_call": ms,
                    "speedup_vs_hf": base * 1000 / ms,
                    "expert_bytes": expert_bytes(system),
                    "max_rel_diff_vs_hf": error[name, n],
                }
            )
    print(f"\n{args.experts} experts, hidden {args.hidden}, width {args.width}, top-{args.top_k}, ")
    print(f"{args.dtype}, {torch.get_num_threads()} threads, median of {args.repeats} calls\n")
    print("| system | tokens | ms per call | vs HF | expert weights | max rel. diff vs HF |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['system']} | {row['tokens']} | {row['ms_per_call']:.2f} | "
            f"{row['speedup_vs_hf']:.2f}x | {row['expert_bytes'] / 2**30:.2f} GiB | "
            f"{row['max_rel_diff_vs_hf']:.1e} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": machine(cpu),
            "args": vars(args) | {"out": str(args.out)},
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
