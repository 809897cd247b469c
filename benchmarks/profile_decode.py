"""Where one decode step's time goes: kernels per step, GPU time per kernel family, wall time.

For planning speed work, not a benchmark (no baseline): builds a random-weight shape, patches it
with the family's rule file, prefills a prompt, then profiles `--steps` decode steps (CUDA-graph
replays on GPU) with torch.profiler and prints a warm prefill's wall and GPU time with its
costliest host ops and kernels (at --prompt-len and at each of --prefill-lens), then, for each
decode graph the engine can keep (separate kernels, norms folded into the projections;
`--paths`) and for the one it chooses:
- wall ms per step, as `Engine.generate` runs it (decode_sampled: the sampled token is fed on
  the device and read while the next step runs),
- GPU kernels per step and GPU ms per step,
- the kernels grouped by name, by total GPU time.

    python3 benchmarks/profile_decode.py --shape smollm2-135m --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ktinject import optimize
from ktinject.bench.shapes import SHAPES, random_model
from ktinject.engine import Engine
from ktinject.loading import DTYPES, rules_for


def decode_steps(engine: Engine, sampled: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits, _ = engine.decode_sampled([0], sampled)
        sampled = logits.argmax(dim=-1)
    return sampled


PATHS = {"plain": False, "fused": True, "auto": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--paths", default="plain,fused,auto", help="decode graphs to profile")
    parser.add_argument(
        "--prefill-lens",
        default="4096",
        help="more prompt lengths whose prefill is profiled (comma-separated; '' for none)",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    model = random_model(args.shape, device, DTYPES[args.dtype], seed=0)
    model, _ = optimize(model, rules_for(model.config.model_type))
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    extra = [int(n) for n in args.prefill_lens.split(",") if n.strip()]
    for length in dict.fromkeys([args.prompt_len, *extra]):
        profile_prefill(model, where, length, args)
    for path in args.paths.split(","):
        engine = Engine(model, cache_lens=args.prompt_len + 4 * args.steps + 256)
        if PATHS[path] is not None:
            engine.fused_gemv_choice[1] = PATHS[path]
        profile_path(engine, path, where, args)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_prefill(
    model: torch.nn.Module, where: str, length: int, args: argparse.Namespace
) -> None:
    """One prefill of `length` tokens, warm: wall time next to GPU busy time, the host ops and
    the kernels that take longest (on an H200, 2026-11-27: ~37 ms at 128 tokens for both HF and
    ktinject, far above the GPU work; at 4,096 SmolLM2 prefilled at 0.85x HF eager)."""
    engine = Engine(model, cache_lens=length + 256)
    prompt = prompt_ids(model, length)
    for _ in range(2):
        engine.prefill(0, prompt, reuse=False)[0].argmax().item()
    started = time.perf_counter()
    engine.prefill(0, prompt, reuse=False)[0].argmax().item()
    wall_ms = (time.perf_counter() - started) * 1e3
    activities = [ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        engine.prefill(0, prompt, reuse=False)[0].argmax().item()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3
    print(f"\n== {args.shape} {args.dtype} on {where}, prefill of {length} tokens")
    print(f"wall {wall_ms:.2f} ms; GPU busy {gpu_ms:.2f} ms in {len(kernels)} kernels")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.top))
    print_kernels(kernels, 1, args.top)


def profile_path(engine: Engine, path: str, where: str, args: argparse.Namespace) -> None:
    logits, _ = engine.prefill(0, prompt_ids(engine.model, args.prompt_len))
    sampled = decode_steps(engine, logits.argmax(dim=-1)[None], 5)  # capture and warm up
    sampled[0].item()

    started = time.perf_counter()
    sampled = decode_steps(engine, sampled, args.steps)
    sampled[0].item()
    wall_ms = (time.perf_counter() - started) * 1e3 / args.steps

    device = engine.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        decode_steps(engine, sampled, args.steps)[0].item()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) / args.steps

    print(
        f"\n== {args.shape} {args.dtype} on {where}, decode graph: {path} -> kept "
        f"{engine.fused_gemv_choice or '(no graph)'}, capture {engine.capture_s:.2f} s"
    )
    print(f"wall {wall_ms:.3f} ms/step ({1e3 / wall_ms:.0f} tok/s); graphs: {engine.cuda_graph}")
    print(f"GPU kernels {len(kernels) / args.steps:.0f}/step, GPU busy {gpu_us / 1e3:.3f} ms/step")
    print_kernels(kernels, args.steps, args.top)
    if device.type != "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def prompt_ids(model: torch.nn.Module, length: int) -> list[int]:
    vocab = model.config.vocab_size
    return [i % (vocab - 1) + 1 for i in range(length)]


def print_kernels(kernels: list, steps: int, top: int) -> None:
    """GPU kernels grouped by name, costliest first: launches and microseconds per step."""
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in kernels:
        per_name[event.name].append(event.device_time)
    ranked = sorted(per_name.items(), key=lambda item: -sum(item[1]))
    print(f"{'kernel':70s} {'per step':>8s} {'us each':>8s} {'us/step':>8s}")
    for name, times in ranked[:top]:
        each = sum(times) / len(times)
        print(f"{name[:70]:70s} {len(times) / steps:8.1f} {each:8.2f} {sum(times) / steps:8.1f}")


if __name__ == "__main__":
    main()
