"""Benchmark the OpenAI-compatible server in-process.

(a) Time to first token of turn N of a conversation with a long history (`--history-tokens`),
    with history reuse vs `--no-prefix-reuse` (target: >= 10x faster with reuse). The clock runs
    from sending the request's JSON to reading the first streamed chunk, through plain HTTP: the
    `openai` client spends ~17 ms of its own (2-core EPYC) checking a 60-message body before it
    sends anything, the same with and without reuse, and that is the client's time, not serving.
(b) Aggregate decode throughput of `--streams` concurrent streams vs one stream
    (target on GPU: >= 4x), each stream through the `openai` client in a process of its own,
    alternating for `--repeats` rounds (medians).

Both sides of each ratio run in the same process on the same engine. Prints a table and writes
JSON (`--out`). On CPU use small sizes, e.g. `--history-tokens 1000 --stream-tokens 32`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

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


def first_token_time(http: httpx.Client, messages: list[dict[str, str]], tokens: int) -> dict:
    """Stream one turn; seconds from sending it to its first chunk (sent once the first token
    is sampled)."""
    body = json.dumps(
        {
            "model": "m",
            "messages": messages,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    headers = {"content-type": "application/json"}
    started = time.perf_counter()
    ttft, text, usage = None, [], None
    with http.stream("POST", "/v1/chat/completions", content=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ttft = ttft if ttft is not None else time.perf_counter() - started
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"]:
                text.append(chunk["choices"][0]["delta"].get("content") or "")
            usage = chunk.get("usage") or usage
    return {
        "ttft_s": ttft,
        "text": "".join(text),
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
    }


def bench_history(engine: Engine, tokenizer: Any, args: argparse.Namespace, reuse: bool) -> dict:
    """Per repeat: turn N-1 (primes the slot), then turn N, whose first-token time is measured."""
    past = history(tokenizer, args.history_tokens)
    config = ServeConfig(prefix_reuse=reuse)
    turns = []
    app = create_app(engine, tokenizer, config)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=600) as http:
        for i in range(args.repeats):
            asked = [*past, {"role": "user", "content": f"Question {i}: what came first?"}]
            answer = first_token_time(http, asked, args.answer_tokens)["text"]
            follow_up = [
                *asked,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And after that?"},
            ]
            turns.append(first_token_time(http, follow_up, args.answer_tokens))
    return {
        "ttft_s": statistics.median(t["ttft_s"] for t in turns),
        "prompt_tokens": turns[-1]["prompt_tokens"],
        "cached_tokens": turns[-1]["cached_tokens"],
        "answers": [t["text"] for t in turns],
    }


Streamer = Callable[[int, int], int]  # (stream index, max tokens) -> completion tokens


def openai_streamer(url: str) -> Streamer:
    """Streams through the official `openai` client (one connection, reused)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)

    def stream(index: int, max_tokens: int) -> int:
        chunks = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": f"Write story number {index}."}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        return [chunk.usage for chunk in chunks if chunk.usage][0].completion_tokens

    return stream


def _client_process(
    streamer: Callable[[str], Streamer], url: str, index: int, tokens: int, start: Any, results: Any
) -> None:
    """One client: an untimed one-token stream (opens the connection and loads what the client
    needs for a response), then, once every client is ready, the measured stream."""
    stream = streamer(url)
    stream(index, 1)
    start.wait()
    began = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    generated = stream(index, tokens)
    results.put((generated, began, time.perf_counter()))


def streams_from_other_processes(
    url: str, count: int, tokens: int, streamer: Callable[[str], Streamer] = openai_streamer
) -> tuple[int, float]:
    """`count` concurrent streams, each from a client process of its own, as real clients are.
    One process reading every stream capped what it measured: the `openai` client spends ~0.7 ms
    of CPU on each streamed chunk (2-core EPYC, 2026-11-29), so 8 streams in one process could
    not read more than ~1,400 chunks a second, whatever the server sent. Returns the tokens
    generated and the seconds from the first stream's start to the last one's end."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(count), context.Queue()
    clients = [
        context.Process(target=_client_process, args=(streamer, url, i, tokens, start, results))
        for i in range(count)
    ]
    for client in clients:
        client.start()
    try:
        done = [results.get(timeout=600) for _ in clients]
    finally:
        for client in clients:
            client.join()
    generated = sum(n for n, _, _ in done)
    return generated, max(end for _, _, end in done) - min(began for _, began, _ in done)


def bench_throughput(engine: Engine, tokenizer: Any, args: argparse.Namespace) -> dict:
    """One stream and `--streams` streams, alternating for `--repeats` rounds (medians)."""
    rounds: dict[int, list[tuple[int, float]]] = {1: [], args.streams: []}
    with BackgroundServer(create_app(engine, tokenizer, ServeConfig())) as server:
        for _ in range(args.repeats):
            for count in rounds:
                rounds[count].append(
                    streams_from_other_processes(server.url, count, args.stream_tokens)
                )
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
