"""What the server's own work allows: streams and first-token time with a pretend GPU.

For planning server work on a machine without a GPU, not a benchmark against a baseline. Each
decode step of the engine is replaced by a wait of `--step-ms` that leaves the GIL free and
holds up only the step after it, as a step queued on a GPU does (the host prepares step n+1 while
the device runs step n); sampling gives a fixed token, as an argmax queued on the device would
(on a CPU the real one reads the whole vocabulary's logits). A prefill chunk waits as the GPU
engine's would: a chunk of at most `--replay-tokens` replays a decode graph (`--replay-ms`), a
longer one runs eagerly (`--prefill-ms` + `--prefill-us-per-token` a token). The defaults are
SmolLM2 on the H200 of 2026-11-27: an eager prefill there took 37.0 ms for 128 tokens and 40.2
ms for 4,096 (host work: HF eager alike), so a 4k prompt in `--chunk-size` 512 chunks (`serve`'s
default, and `bench_server.py`'s) takes ~300 ms, about what the server benchmark measured then
(292.6 ms); a replay is a decode step with up to 64 rows, each reading a 4k prefix (3 ms is a
guess: not yet measured). Everything else
runs as served: scheduler, detokenizing, events, SSE, HTTP. Each stream is a client process of
its own reading lines with httpx: the `openai` client spends ~0.7 ms of CPU a chunk (~3x this
reader) and on a 2-core machine measures itself more than the server (`bench_server.py` uses it,
for the real thing on a GPU).

On a 2-core EPYC (2026-11-29), SmolLM2's tokenizer, 1,024 tokens a stream: with a 1 ms step one
stream 984 tok/s (the step's bound), eight streams 7,080 tok/s (7.2x); with 0.5 ms, 1,919 and
11,365 tok/s (5.9x: 0.70 ms of host work a step of eight). Time to first token (first chunk
with text) of a turn after a 4,117-token history, with a pretend prefill of 1 ms + 10 us a token
for every chunk (a GPU-bound engine, one 4k chunk): 6.9 ms with reuse, 48.1 without (7.0x; 10.7
and 50.4 before the stream started early and the prompt ids came from the tokenizer's backend);
with the defaults (the H200's engine): 9.7 and 313.9 ms (32x).

    python3 benchmarks/server_ceiling.py /path/to/model-dir --step-ms 1 --streams 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from bench_server import bench_history
from stream_clients import streams_from_processes

import ktinject.server.scheduler
from ktinject.engine import Engine
from ktinject.loading import load
from ktinject.server.app import create_app
from ktinject.server.background import BackgroundServer
from ktinject.server.config import ServeConfig


class PretendDevice:
    """Stands in for the GPU behind `engine` (see the module docstring): decode steps are queued
    one deep, a prefill chunk costs `replay_s` (at most `replay_tokens` tokens) or `prefill_s +
    token_s` a token and is waited for (its logits are sampled on the host); the cache's
    lengths and token ids advance as in real steps."""

    def __init__(
        self,
        engine: Engine,
        token: int,
        *,
        step_s: float,
        prefill_s: float,
        token_s: float,
        replay_s: float,
        replay_tokens: int,
    ) -> None:
        self.engine = engine
        self.step_s, self.prefill_s, self.token_s = step_s, prefill_s, token_s
        self.replay_s, self.replay_tokens = replay_s, replay_tokens
        self.logits = torch.zeros(engine.num_slots, engine.vocab_size)
        self.logits[:, token] = 1.0
        self.picks = torch.full((engine.num_slots,), token)
        self.done_at = 0.0  # when the last queued work ends
        engine._decode_static = self.decode_step
        engine._forward_chunk = self.prefill_chunk
        ktinject.server.scheduler.sample_rows = lambda rows, _: self.picks[: len(rows)]

    def _queue(self, seconds: float, *, wait_for_it: bool) -> None:
        now = time.perf_counter()
        if not wait_for_it and now < self.done_at:  # the step before this one
            time.sleep(self.done_at - now)
        self.done_at = max(now, self.done_at) + seconds
        if wait_for_it:
            time.sleep(self.done_at - now)

    def decode_step(self, slots: list[int], token_ids: Any) -> torch.Tensor:
        self._queue(self.step_s, wait_for_it=False)
        for slot in slots:
            self.engine.cache.lengths[slot] += 1
        return self.logits[: len(slots)]

    def prefill_chunk(self, slot: int, start: int, chunk: list[int]) -> torch.Tensor:
        replayed = len(chunk) <= self.replay_tokens
        cost = self.replay_s if replayed else self.prefill_s + self.token_s * len(chunk)
        self._queue(cost, wait_for_it=True)
        self.engine.cache.lengths[slot] = start + len(chunk)
        self.engine.cache.tokens[slot].extend(chunk)
        return self.logits[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="default: embedded SmolLM2")
    parser.add_argument("--step-ms", type=float, default=1.0, help="the pretend device's step")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--prefill-ms", type=float, default=37.0, help="an eager prefill chunk's fixed cost"
    )
    parser.add_argument("--prefill-us-per-token", type=float, default=0.8)
    parser.add_argument("--replay-ms", type=float, default=3.0, help="a replayed prefill chunk")
    parser.add_argument(
        "--replay-tokens", type=int, default=64, help="longest chunk a decode graph replays"
    )
    parser.add_argument("--chunk-size", type=int, default=512, help="as `serve`'s default")
    parser.add_argument("--history-tokens", type=int, default=4000)
    args = parser.parse_args(argv)
    args.repeats, args.answer_tokens = args.rounds, 16  # for bench_server.bench_history
    loaded = load(args.model, progress=False)
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        cache_lens=max(args.stream_tokens + 64, args.history_tokens + 512),
        num_slots=args.streams,
        chunk_size=args.chunk_size,
    )
    token = loaded.tokenizer.encode(" the", add_special_tokens=False)[0]
    PretendDevice(
        engine,
        token,
        step_s=args.step_ms / 1e3,
        prefill_s=args.prefill_ms / 1e3,
        token_s=args.prefill_us_per_token / 1e6,
        replay_s=args.replay_ms / 1e3,
        replay_tokens=args.replay_tokens,
    )
    reuse, fresh = (
        bench_history(engine, loaded.tokenizer, args, reuse=reuse) for reuse in (True, False)
    )
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
    print(
        f"time to first token, {reuse['prompt_tokens']:,}-token prompt: "
        f"{reuse['ttft_s'] * 1e3:.1f} ms reusing {reuse['cached_tokens']:,}, "
        f"{fresh['ttft_s'] * 1e3:.1f} ms without: {fresh['ttft_s'] / reuse['ttft_s']:.1f}x "
        f"(pretend prefill: chunks of {args.chunk_size}, {args.prefill_ms} ms + "
        f"{args.prefill_us_per_token} us a token, {args.replay_ms} ms a chunk of at most "
        f"{args.replay_tokens})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
