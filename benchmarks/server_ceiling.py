"""How fast the server itself can stream: its tokens per second when the model step is free.

For planning server work on a machine without a GPU, not a benchmark against a baseline. Each
decode step of the engine is replaced by a wait of `--step-ms` that leaves the GIL free and
holds up only the step after it, as a step queued on a GPU does (the host prepares step n+1 while
the device runs step n); sampling gives a fixed token, as an argmax queued on the device would
(on a CPU the real one reads the whole vocabulary's logits). Everything else runs as served:
scheduler, detokenizing, events, SSE, HTTP. Each stream is a client process of its own reading
lines with httpx: the `openai` client spends ~0.7 ms of CPU a chunk (~3x this reader) and on a
2-core machine measures itself more than the server (`bench_server.py` uses it, for the real
thing on a GPU).

On a 2-core EPYC (2026-11-29), SmolLM2's tokenizer, 1,024 tokens a stream: with a 1 ms step one
stream 984 tok/s (the step's bound), eight streams 7,080 tok/s (7.2x); with 0.5 ms, 1,919 and
11,365 tok/s (5.9x: 0.70 ms of host work a step of eight).

    python3 benchmarks/server_ceiling.py /path/to/model-dir --step-ms 1 --streams 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from stream_clients import streams_from_processes

import ktinject.server.scheduler
from ktinject.engine import Engine
from ktinject.loading import load
from ktinject.server.app import create_app
from ktinject.server.background import BackgroundServer
from ktinject.server.config import ServeConfig


def simulate_device(engine: Engine, step_s: float, token: int) -> None:
    """Make `engine`'s decode steps a queue of depth one on a pretend device (see the module
    docstring); the cache lengths advance as in a real step."""
    logits = torch.zeros(engine.num_slots, engine.vocab_size)
    logits[:, token] = 1.0
    picks = torch.full((engine.num_slots,), token)
    done_at = 0.0

    def step(slots: list[int], token_ids: Any) -> torch.Tensor:
        nonlocal done_at
        now = time.perf_counter()
        if now < done_at:
            time.sleep(done_at - now)
        done_at = max(now, done_at) + step_s
        for slot in slots:
            engine.cache.lengths[slot] += 1
        return logits[: len(slots)]

    engine._decode_static = step
    ktinject.server.scheduler.sample_rows = lambda completions, _: picks[: len(completions)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="default: embedded SmolLM2")
    parser.add_argument("--step-ms", type=float, default=1.0, help="the pretend device's step")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    loaded = load(args.model, progress=False)
    engine = Engine(
        loaded.model, loaded.tokenizer, cache_lens=args.stream_tokens + 64, num_slots=args.streams
    )
    token = loaded.tokenizer.encode(" the", add_special_tokens=False)[0]
    simulate_device(engine, args.step_ms / 1e3, token)
    rates: dict[int, list[float]] = {1: [], args.streams: []}
    with BackgroundServer(create_app(engine, loaded.tokenizer, ServeConfig())) as server:
        for _ in range(args.rounds):
            for count, measured in rates.items():
                generated, seconds = streams_from_processes(
                    server.url, count, args.stream_tokens, client="httpx"
                )
                measured.append(generated / seconds)
    one, many = (statistics.median(rates[count]) for count in (1, args.streams))
    print(f"pretend device step {args.step_ms} ms ({1e3 / args.step_ms:,.0f} steps/s)")
    print(f"1 stream: {one:,.0f} tok/s  (rounds: {', '.join(f'{r:,.0f}' for r in rates[1])})")
    print(
        f"{args.streams} streams: {many:,.0f} tok/s, {args.streams / many * 1e3:.2f} ms a step  "
        f"(rounds: {', '.join(f'{r:,.0f}' for r in rates[args.streams])})"
    )
    print(f"ratio: {many / one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
