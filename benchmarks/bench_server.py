"""Benchmark the OpenAI-compatible server, run in this process, against client processes.

(a) Time to first token of turn N of a conversation with a long history (`--history-tokens`),
    with history reuse vs `--no-prefix-reuse` (target: >= 10x faster with reuse). The clock runs
    from sending the request's JSON to reading the first streamed text, through plain HTTP (httpx)
    in a client process of its own: the `openai` client spends ~17 ms of its own (2-core EPYC)
    checking a 60-message body before it sends anything, the same with and without reuse, and
    that is the client's time, not serving; a client in the server's process would share the GIL
    with the server's threads.
(b) Aggregate decode throughput of `--streams` concurrent streams vs one stream
    (target on GPU: >= 4x), each stream through the `openai` client in a process of its own,
    alternating for `--repeats` rounds (medians).

Both sides of each ratio run in the same process on the same engine. Prints a table and writes
JSON (`--out`). On CPU use small sizes, e.g. `--history-tokens 1000 --stream-tokens 32`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from stream_clients import TurnClient, streams_from_processes

from ktinject.chat import chat_prompt_ids
from ktinject.engine import Engine
from ktinject.loading import load
from ktinject.server.app import create_app
from ktinject.server.background import BackgroundServer
from ktinject.server.config import ServeConfig

WORDS = (
    "the model reads a long history of messages and answers each question with care while the "
    "cache keeps every token it has already seen so that the next turn starts almost at once"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="default: embedded SmolLM2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--history-tokens", type=int, default=4000)
    parser.add_argument("--answer-tokens", type=int, default=16, help="new tokens per turn")
    parser.add_argument("--repeats", type=int, default=3, help="turns measured per setting")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=256, help="tokens per stream")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--rules", default="auto", help="rule file (e.g. llama-cpu-q4 on a CPU)")
    parser.add_argument("--compile", action="store_true", help="CPU decode via torch.compile")
    parser.add_argument("--out", type=Path, default=Path("bench-out/server.json"))
    return parser.parse_args(argv)


def history(tokenizer: Any, target_tokens: int) -> list[dict[str, str]]:
    """User/assistant turns of filler text whose templated length just reaches the target."""
    rng = random.Random(0)
    messages: list[dict[str, str]] = []
    while len(chat_prompt_ids(tokenizer, messages or [{"role": "user", "content": ""}])) < (
        target_tokens
    ):
        for role in ("user", "assistant"):
            text = " ".join(rng.choice(WORDS.split()) for _ in range(60))
            messages.append({"role": role, "content": text})
    return messages


def bench_history(engine: Engine, tokenizer: Any, args: argparse.Namespace, reuse: bool) -> dict:
    """Per repeat: turn N-1 (primes the slot), then turn N, whose first-token time is measured."""
    past = history(tokenizer, args.history_tokens)
    config = ServeConfig(prefix_reuse=reuse)
    turns = []
    app = create_app(engine, tokenizer, config)
    with BackgroundServer(app) as server, TurnClient(server.url) as client:
        for i in range(args.repeats):
            asked = [*past, {"role": "user", "content": f"Question {i}: what came first?"}]
            answer = client.turn(asked, args.answer_tokens)["text"]
            follow_up = [
                *asked,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And after that?"},
            ]
            turns.append(client.turn(follow_up, args.answer_tokens))
    return {
        "ttft_s": statistics.median(t["ttft_s"] for t in turns),
        "prompt_tokens": turns[-1]["prompt_tokens"],
        "cached_tokens": turns[-1]["cached_tokens"],
        "answers": [t["text"] for t in turns],
    }


def bench_throughput(engine: Engine, tokenizer: Any, args: argparse.Namespace) -> dict:
    """One stream and `--streams` streams, alternating for `--repeats` rounds (medians)."""
    rounds: dict[int, list[tuple[int, float]]] = {1: [], args.streams: []}
    with BackgroundServer(create_app(engine, tokenizer, ServeConfig())) as server:
        for _ in range(args.repeats):
            for count in rounds:
                rounds[count].append(streams_from_processes(server.url, count, args.stream_tokens))
    results = {}
    for count, measured in rounds.items():
        rates = [generated / seconds for generated, seconds in measured]
        results[count] = {
            "tokens": measured[0][0],
            "seconds": [seconds for _, seconds in measured],
            "tok_s": statistics.median(rates),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load(
        args.model, rules=args.rules, device=args.device, dtype=args.dtype, progress=False
    )
    cache_lens = max(args.history_tokens + 512, args.stream_tokens + 64)
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        cache_lens=cache_lens,
        num_slots=args.streams,
        chunk_size=args.chunk_size,
        cuda_graph=not args.no_cuda_graph,
        compile=args.compile,
    )
    tokenizer = loaded.tokenizer
    reuse = bench_history(engine, tokenizer, args, reuse=True)
    fresh = bench_history(engine, tokenizer, args, reuse=False)
    streams = bench_throughput(engine, tokenizer, args)
    single, many = streams[1], streams[args.streams]
    result = {
        "model": loaded.source.label,
        "device": str(loaded.device),
        "dtype": str(next(loaded.model.parameters()).dtype),
        "args": {k: str(v) for k, v in vars(args).items()},
        "cache_lens": cache_lens,
        "history": {
            "reuse": reuse,
            "no_reuse": fresh,
            "speedup": fresh["ttft_s"] / reuse["ttft_s"],
        },
        "throughput": {
            "single": single,
            "concurrent": many,
            "streams": args.streams,
            "speedup": many["tok_s"] / single["tok_s"],
        },
        "same_answers": reuse["answers"] == fresh["answers"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    h, t = result["history"], result["throughput"]
    rows = [
        (
            f"TTFT turn N, {h['reuse']['prompt_tokens']:,}-token prompt",
            f"{h['reuse']['ttft_s'] * 1e3:,.1f} ms (cached {h['reuse']['cached_tokens']:,})",
            f"{h['no_reuse']['ttft_s'] * 1e3:,.1f} ms (no reuse)",
            f"{h['speedup']:.1f}x",
            ">= 10x",
        ),
        (
            f"decode throughput, {t['streams']} streams",
            f"{t['concurrent']['tok_s']:,.1f} tok/s",
            f"{t['single']['tok_s']:,.1f} tok/s (1 stream)",
            f"{t['speedup']:.1f}x",
            ">= 4x (GPU)",
        ),
    ]
    header = ("", "ktinject", "baseline", "ratio", "target")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"{result['model']} on {result['device']} ({result['dtype']})")
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"greedy answers identical with and without reuse: {result['same_answers']}")


if __name__ == "__main__":
    sys.exit(main())
