"""Concurrent streaming clients for the server benchmarks, each a process of its own.

One process reading every stream measured itself: the `openai` client spends ~0.7 ms of CPU on
each streamed chunk (2-core EPYC, 2026-11-29), so 8 streams in one process could not read more
than ~1,400 chunks a second, whatever the server sent. Real clients are separate processes, so
here each stream is one. They are started as plain scripts (this file), not through
multiprocessing's spawn, which re-imports the benchmark's own module (torch, transformers: ~9 s
and ~400 MB a client on that CPU); this file imports only its client library.

As a script (what `streams_from_processes` runs):

    python3 stream_clients.py URL INDEX TOKENS {openai,httpx}

streams once untimed (opens the connection, loads what a response needs), prints `ready`, waits
for a line on stdin, streams TOKENS tokens and prints a JSON line with the completion tokens and
its start and end on the monotonic clock (comparable across processes).

    python3 stream_clients.py URL turns

(what `TurnClient` runs) reads one JSON line per turn (`messages`, `tokens`), streams it and
prints a JSON line with its time to first token, text and usage. The time to first token is
taken here rather than in the benchmark's process, where the client would share the GIL with
the server's threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Streamer = Callable[[int, int], int]  # (stream index, max tokens) -> completion tokens


def prompt(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write story number {index}."}]


def stream_body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """A greedy streamed chat request that ends with a usage chunk."""
    return {
        "model": "m",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def start_client(*args: str) -> subprocess.Popen[str]:
    """This file as a script with `args`, talking over pipes."""
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def openai_streamer(url: str) -> Streamer:
    """Streams through the official `openai` client (one connection, reused)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)

    def stream(index: int, max_tokens: int) -> int:
        chunks = client.chat.completions.create(
            **stream_body(prompt(index), max_tokens), extra_body={"ignore_eos": True}
        )
        return [chunk.usage for chunk in chunks if chunk.usage][0].completion_tokens

    return stream


def httpx_streamer(url: str) -> Streamer:
    """Streams read as lines with httpx; only the usage chunk is parsed (~0.2 ms of CPU a chunk
    on that CPU, with the JSON of every chunk parsed)."""
    import httpx

    http = httpx.Client(base_url=url, timeout=600)

    def stream(index: int, max_tokens: int) -> int:
        body = {**stream_body(prompt(index), max_tokens), "ignore_eos": True}
        usage = None
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    usage = json.loads(line.removeprefix("data: "))["usage"] or usage
        return usage["completion_tokens"]

    return stream


STREAMERS: dict[str, Callable[[str], Streamer]] = {
    "openai": openai_streamer,
    "httpx": httpx_streamer,
}


def streams_from_processes(
    url: str, count: int, tokens: int, client: str = "openai", timeout_s: float = 600.0
) -> tuple[int, float]:
    """`count` concurrent streams of `tokens` tokens, one client process each, started together
    once all are ready. Returns the tokens generated and the seconds from the first stream's
    start to the last one's end."""
    processes: list[subprocess.Popen[str]] = []
    try:
        for index in range(count):
            processes.append(start_client(url, str(index), str(tokens), client))
        for process in processes:
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a client did not start: {' '.join(process.args)}")
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        done = [json.loads(process.communicate(timeout=timeout_s)[0]) for process in processes]
    finally:
        for process in processes:
            process.kill()
    generated = sum(d["tokens"] for d in done)
    return generated, max(d["ended"] for d in done) - min(d["began"] for d in done)


def first_token_time(http: Any, messages: list[dict[str, str]], tokens: int) -> dict:
    """Stream one turn; seconds from sending it to the first chunk with text (the stream itself
    starts earlier, with a chunk that only names the role, while the prompt is prefilled), or
    to its end if the answer has no text (random weights may pick an end-of-sequence id)."""
    body = json.dumps(stream_body(messages, tokens))
    headers = {"content-type": "application/json"}
    started = time.perf_counter()
    ttft, text, usage = None, [], None
    with http.stream("POST", "/v1/chat/completions", content=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            arrived = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            choice = chunk["choices"][0] if chunk["choices"] else {}
            piece = choice.get("delta", {}).get("content")
            if ttft is None and (piece or choice.get("finish_reason")):
                ttft = arrived - started
            text.append(piece or "")
            usage = chunk.get("usage") or usage
    return {
        "ttft_s": ttft,
        "text": "".join(text),
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
    }


class TurnClient:
    """Turns of a conversation, each timed from sending it to its first text by a client process
    of its own (this file, `turns`); a context manager."""

    def __init__(self, url: str) -> None:
        self.process = start_client(url, "turns")

    def turn(self, messages: list[dict[str, str]], tokens: int) -> dict:
        """`first_token_time` of one turn, in the client process."""
        self.process.stdin.write(json.dumps({"messages": messages, "tokens": tokens}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the turn client stopped: {' '.join(self.process.args)}")
        return json.loads(line)

    def __enter__(self) -> TurnClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def time_turns(url: str) -> None:
    """The `turns` script: one timed turn per JSON line on stdin."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        for line in sys.stdin:
            asked = json.loads(line)
            result = first_token_time(http, asked["messages"], asked["tokens"])
            print(json.dumps(result), flush=True)


def main(argv: list[str]) -> int:
    if argv[1:] == ["turns"]:
        time_turns(argv[0])
        return 0
    url, index, tokens, client = argv[0], int(argv[1]), int(argv[2]), argv[3]
    stream = STREAMERS[client](url)
    stream(index, 1)
    print("ready", flush=True)
    sys.stdin.readline()
    began = time.monotonic()
    generated = stream(index, tokens)
    print(json.dumps({"tokens": generated, "began": began, "ended": time.monotonic()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
