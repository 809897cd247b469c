"""Where a streamed token's time goes in the server: engine calls vs everything else.

For planning speed work, not a benchmark: starts the server in-process on a model directory,
wraps `engine.prefill` / `engine.decode_sampled` (the scheduler's decode) with timers, streams
`--tokens` tokens through the `openai` client, and prints the client's time to first token and
mean gap between tokens next to the time the worker spent inside the engine per token. A large
difference is server overhead (HTTP, scheduling, detokenization, thread hand-offs).

    python3 benchmarks/profile_server.py /path/to/model-dir --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import openai

from ktinject.engine import Engine
from ktinject.loading import load
from ktinject.server.app import create_app
from ktinject.server.background import BackgroundServer
from ktinject.server.config import ServeConfig


def timed(spent: dict[str, list[float]], name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name].append(time.perf_counter() - started)

    return wrapper


def stream_once(url: str, tokens: int) -> tuple[float, list[float]]:
    """(time to first chunk, gaps between later chunks) of one streamed request."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
    started = time.perf_counter()
    stamps = []
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return stamps[0] - started, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="default: embedded SmolLM2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    loaded = load(args.model, device=args.device, dtype=args.dtype, progress=False)
    engine = Engine(loaded.model, loaded.tokenizer, cache_lens=1024, num_slots=2, chunk_size=512)
    spent: dict[str, list[float]] = defaultdict(list)
    engine.prefill = timed(spent, "prefill", engine.prefill)
    engine.decode_sampled = timed(spent, "decode", engine.decode_sampled)
    with BackgroundServer(create_app(engine, loaded.tokenizer, ServeConfig())) as server:
        stream_once(server.url, 4)  # warm-up
        for round_ in range(args.rounds):
            spent.clear()
            ttft, gaps = stream_once(server.url, args.tokens)
            gap_ms = sum(gaps) / len(gaps) * 1e3
            decode_ms = sum(spent["decode"]) / max(1, len(spent["decode"])) * 1e3
            prefill_ms = sum(spent["prefill"]) * 1e3
            print(
                f"round {round_}: TTFT {ttft * 1e3:.1f} ms (prefill {prefill_ms:.1f} ms in the "
                f"engine); gap {gap_ms:.2f} ms/token, of which engine.decode "
                f"{decode_ms:.2f} ms ({len(spent['decode'])} calls)"
            )


if __name__ == "__main__":
    main()
