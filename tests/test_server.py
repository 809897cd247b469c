"""The OpenAI-compatible server, driven through the official `openai` client.

Servers run in-process (uvicorn on a background thread, a free loopback port) around a tiny
random-weight Llama with the shipped llama rules (static-cache attention), and a character-level
tokenizer built here, offline, with a ChatML-like template. Greedy outputs are checked against the
engine's own single-sequence `generate`, so batching, chunked prefill and history reuse must not
change a single token. One test serves the embedded SmolLM2.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import ClientDisconnect
from tiny_models import tiny_model
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from ktinject import optimize
from ktinject.chat import chat_prompt_ids
from ktinject.engine import Engine
from ktinject.errors import KtinjectError
from ktinject.sampling import SamplingParams
from ktinject.server import add_serve_arguments
from ktinject.server.app import create_app
from ktinject.server.background import BackgroundServer
from ktinject.server.config import ServeConfig
from ktinject.server.formats import ChatFormat
from ktinject.server.handler import Handler
from ktinject.server.launch import bind, resolve_options, run_serve
from ktinject.server.metrics import ServerMetrics
from ktinject.server.schemas import ChatCompletionRequest

CACHE_LENS = 256
SLOTS = 4
CHUNK = 16  # small, so prompts are prefilled over several scheduler steps
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """256 ids: 3 special tokens, newline, printable ASCII, then Latin Extended letters, one
    character per token, so every id decodes to text and re-encodes to itself."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    chars += [chr(c) for c in range(0x100, 0x100 + 256 - len(SPECIAL) - len(chars))]
    vocab = {token: i for i, token in enumerate(SPECIAL + chars)}
    model = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=TEMPLATE,
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize(tiny_model("llama"), "llama")[0]


def make_engine(model, tokenizer) -> Engine:
    return Engine(model, tokenizer, cache_lens=CACHE_LENS, num_slots=SLOTS, chunk_size=CHUNK)


@contextmanager
def serving(engine: Engine, tokenizer, **config) -> Iterator[str]:
    """A server around `engine`; yields its base URL."""
    app = create_app(engine, tokenizer, ServeConfig(model_name="tiny", **config))
    with BackgroundServer(app) as server:
        yield server.url


@pytest.fixture(scope="module")
def url(model, tokenizer) -> Iterator[str]:
    with serving(make_engine(model, tokenizer), tokenizer) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(model, tokenizer):
    """Greedy text of the engine's single-sequence loop: what every server answer must equal."""
    engine = Engine(model, tokenizer)

    def generate(ids: list[int], max_tokens: int, ignore_eos: bool = False) -> str:
        params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=ignore_eos)
        return engine.generate(ids, params).result()

    return generate


def chat(client: openai.OpenAI, messages: list[dict], **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kwargs)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def metric(url: str, name: str, default: float | None = None, **labels: str) -> float:
    """A sample's value; `default` when absent (a labelled counter appears once counted)."""
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    assert default is not None, f"{name}{labels} not in /metrics"
    return default


def wait_for_metric(url: str, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, name) != value:
        assert time.monotonic() < deadline, f"{name} stayed {metric(url, name)}, not {value}"
        time.sleep(0.05)


# -- generation ----------------------------------------------------------------------------------


def test_chat_completion_matches_engine_and_reports_usage(client, tokenizer, reference):
    messages = user("hello there")
    ids = chat_prompt_ids(tokenizer, messages)
    response = chat(client, messages, max_tokens=12, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference(ids, 12, ignore_eos=True)
    assert choice.finish_reason == "length"
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 12)
    assert usage.total_tokens == len(ids) + 12
    assert usage.prompt_tokens_details.cached_tokens >= 0
    assert response.object == "chat.completion" and response.model == "tiny"


def test_chat_stream_equals_non_stream_and_ends_with_usage(client):
    messages = user("stream me")
    whole = chat(client, messages, max_tokens=10).choices[0]
    chunks = list(
        chat(client, messages, max_tokens=10, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    assert chunks[-2].choices[0].finish_reason == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_not(client, tokenizer, reference):
    prompt = "The quick brown fox"
    expected = reference(tokenizer(prompt)["input_ids"], 9)
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=9, temperature=0)
    assert response.choices[0].text == expected
    assert response.usage.prompt_tokens == len(prompt)
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=9, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason


def test_completions_take_token_ids_and_one_prompt_lists(client, tokenizer, reference):
    """As OpenAI's API allows and evaluation harnesses send: ids, or a list of one prompt."""
    prompt = "The quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    expected = reference(ids, 9)
    for given in (ids, [ids], [prompt]):
        response = client.completions.create(model="t", prompt=given, max_tokens=9, temperature=0)
        assert response.choices[0].text == expected
        assert response.usage.prompt_tokens == len(ids)
    vocab = len(tokenizer)  # the tiny model's embedding has as many rows
    refused = [([prompt, prompt], "holds 2 prompts"), ([1, vocab], f"id {vocab}")]
    for given, message in [*refused, (5, "prompt: must be text, a list of token ids")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="t", prompt=given, max_tokens=9, temperature=0)
        assert message in caught.value.body["message"] and caught.value.body["param"] == "prompt"
    response = client.completions.create(model="t", prompt=prompt, max_tokens=9, temperature=0)
    assert response.choices[0].text == expected


def test_stop_string_ends_with_finish_reason_stop(client):
    messages = user("stop somewhere")
    full = chat(client, messages, max_tokens=16, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = text[6:8]
    expected = text[: text.index(stop)]
    response = chat(client, messages, max_tokens=16, stop=[stop, "never"])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    streamed = chat(client, messages, max_tokens=16, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kwargs = {"max_tokens": 8, "seed": 7, "top_p": 0.9}
    first = client.chat.completions.create(model="t", messages=user("x"), temperature=1, **kwargs)
    again = client.chat.completions.create(model="t", messages=user("x"), temperature=1, **kwargs)
    assert first.choices[0].message.content == again.choices[0].message.content


# -- history reuse -------------------------------------------------------------------------------


def test_second_turn_reuses_history_and_matches_a_fresh_server(client, model, tokenizer):
    turn1 = user("Tell me a story")
    answer = chat(client, turn1, max_tokens=10).choices[0].message.content
    turn2 = [*turn1, {"role": "assistant", "content": answer}, *user("And then?")]
    reused = chat(client, turn2, max_tokens=10)
    assert reused.usage.prompt_tokens == len(chat_prompt_ids(tokenizer, turn2))
    # the whole first prompt and the answer's tokens come from the cache
    assert reused.usage.prompt_tokens_details.cached_tokens > len(chat_prompt_ids(tokenizer, turn1))
    with serving(make_engine(model, tokenizer), tokenizer, prefix_reuse=False) as fresh_url:
        fresh = openai.OpenAI(base_url=f"{fresh_url}/v1", api_key="-", max_retries=0)
        chat(fresh, turn1, max_tokens=10)
        baseline = chat(fresh, turn2, max_tokens=10)
    assert baseline.usage.prompt_tokens_details.cached_tokens == 0
    assert reused.choices[0].message.content == baseline.choices[0].message.content


def test_interleaved_conversations_keep_their_own_history(client, tokenizer):
    """A new conversation sharing only the template's first tokens must not evict another."""
    firsts = [user("first conversation"), user("second conversation")]
    answers = [chat(client, m, max_tokens=6).choices[0].message.content for m in firsts]
    for messages, answer in zip(firsts, answers, strict=True):
        follow_up = [*messages, {"role": "assistant", "content": answer}, *user("more")]
        usage = chat(client, follow_up, max_tokens=4).usage
        assert usage.prompt_tokens_details.cached_tokens > len(chat_prompt_ids(tokenizer, messages))


# -- context policy ------------------------------------------------------------------------------


def test_prompt_over_cache_lens_is_400_and_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, user("x" * CACHE_LENS), max_tokens=4)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert str(CACHE_LENS) in error["message"]
    assert chat(client, user("still alive?"), max_tokens=3).choices[0].finish_reason


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_huge_prompt_is_refused_from_its_head(url, tokenizer, monkeypatch, path):
    """Far more characters than the cache could hold as tokens: only the head is tokenized."""
    text = "x" * 1_000_000
    body = {"messages": user(text)} if path.endswith("chat/completions") else {"prompt": text}
    lengths = []
    call = type(tokenizer).__call__

    def measured(self, text, *args, **kwargs):
        lengths.append(len(text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", measured)
    response = httpx.post(f"{url}{path}", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "at least" in error["message"]
    assert max(lengths) < 100_000


def test_overlong_max_tokens_is_clamped_to_the_cache(client, tokenizer):
    messages = user("fill the cache")
    room = CACHE_LENS - len(chat_prompt_ids(tokenizer, messages))
    extra = {"ignore_eos": True}
    clamped = chat(client, messages, max_tokens=10 * CACHE_LENS, extra_body=extra)
    assert clamped.choices[0].finish_reason == "length"
    assert clamped.usage.completion_tokens == room
    defaulted = chat(client, messages, extra_body=extra)  # server default 1024, capped too
    assert defaulted.usage.completion_tokens == room


def test_strict_context_rejects_overlong_max_tokens(model, tokenizer):
    with serving(make_engine(model, tokenizer), tokenizer, strict_context=True) as base:
        strict = openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            chat(strict, user("hi"), max_tokens=CACHE_LENS)
        assert caught.value.body["code"] == "context_length_exceeded"
        assert caught.value.body["param"] == "max_tokens"
        with pytest.raises(openai.BadRequestError) as caught:
            chat(strict, user("hi"), max_completion_tokens=CACHE_LENS)
        assert caught.value.body["param"] == "max_completion_tokens"
        assert "max_completion_tokens to at most" in caught.value.body["message"]
        assert chat(strict, user("hi"), max_tokens=5).usage.completion_tokens <= 5


# -- concurrency ---------------------------------------------------------------------------------


def test_eight_concurrent_streams_equal_their_sequential_outputs(url, tokenizer, reference):
    prompts = [f"client {i}: " + "abcdefgh"[i] * (3 + 5 * i) for i in range(8)]
    expected = [reference(chat_prompt_ids(tokenizer, user(p)), 20) for p in prompts]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.chat.completions.create(
            model="tiny", messages=user(prompt), max_tokens=20, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def all_at_once() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-") as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    batches = metric(url, "ktinject_decode_batch_size_sum")
    steps = metric(url, "ktinject_decode_batch_size_count")
    assert asyncio.run(all_at_once()) == expected
    wait_for_metric(url, "ktinject_kv_slots_in_use", 0)
    batched = metric(url, "ktinject_decode_batch_size_sum") - batches
    assert batched / (metric(url, "ktinject_decode_batch_size_count") - steps) > 2


def test_a_mixed_crowd_over_the_slots_gets_exact_answers_and_leaks_nothing(
    url, tokenizer, reference
):
    """Three times more requests than slots, sent at once and of every kind (chat, streamed chat,
    stop strings, completions, two-turn conversations sharing a system prompt, prompts over the
    cache, clients that hang up): each greedy answer equals the single-sequence engine's."""
    rng = random.Random(0)
    system = {"role": "system", "content": "a system prompt every conversation shares"}
    kinds = ["chat", "stream", "stop", "completion", "two turns", "too long", "hang up"]
    jobs = []  # (kind, prompt text, max_tokens, messages, expected answers), computed up front
    for i in range(3 * SLOTS):
        kind, n = kinds[i % len(kinds)], rng.randint(1, 30)
        text = f"crowd {i} " + "abcdef"[i % 6] * rng.randint(1, 50)
        messages = [system, *user(text)]
        expected = [reference(chat_prompt_ids(tokenizer, messages), n)]
        if kind == "completion":
            expected = [reference(tokenizer(text)["input_ids"], n)]
        elif kind == "two turns":
            follow_up = [*messages, {"role": "assistant", "content": expected[0]}, *user("and?")]
            expected.append(reference(chat_prompt_ids(tokenizer, follow_up), n))
        jobs.append((kind, text, n, messages, expected))

    async def answer(client, messages, n, **kwargs) -> str:
        response = await client.chat.completions.create(
            model="t", messages=messages, max_tokens=n, temperature=0, **kwargs
        )
        if not kwargs.get("stream"):
            return response.choices[0].message.content
        return "".join([c.choices[0].delta.content or "" async for c in response])

    async def one(client, kind, text, n, messages, expected) -> None:
        if kind in ("chat", "stream"):
            assert await answer(client, messages, n, stream=kind == "stream") == expected[0]
        elif kind == "stop":
            stop = expected[0][2:4] or "never"
            cut = expected[0].find(stop) if stop in expected[0] else len(expected[0])
            assert await answer(client, messages, n, stop=stop) == expected[0][:cut]
        elif kind == "completion":
            response = await client.completions.create(
                model="t", prompt=text, max_tokens=n, temperature=0
            )
            assert response.choices[0].text == expected[0]
        elif kind == "two turns":
            assert await answer(client, messages, n) == expected[0]
            messages = [*messages, {"role": "assistant", "content": expected[0]}, *user("and?")]
            assert await answer(client, messages, n) == expected[1]
        elif kind == "too long":
            with pytest.raises(openai.BadRequestError, match="--cache-lens"):
                await answer(client, user("x" * CACHE_LENS), n)
        else:
            body = {"messages": messages, "max_tokens": 100, "stream": True, "ignore_eos": True}
            async with (
                httpx.AsyncClient(base_url=url) as http,
                http.stream("POST", "/v1/chat/completions", json=body) as response,
            ):
                assert (await anext(response.aiter_lines())).startswith("data: ")

    async def crowd() -> None:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
            await asyncio.gather(*(one(client, *job) for job in jobs))

    asyncio.run(crowd())
    wait_for_metric(url, "ktinject_kv_slots_in_use", 0)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_compiled_server_streams_equal_their_sequential_outputs(model, tokenizer, reference):
    """--compile: the scheduler's thread compiles at start-up; batched answers stay exact."""
    engine = Engine(
        model, tokenizer, cache_lens=CACHE_LENS, num_slots=SLOTS, chunk_size=CHUNK, compile=True
    )
    prompts = [f"compiled {i}: " + "xyz"[i % 3] * (2 + 3 * i) for i in range(SLOTS)]
    expected = [reference(chat_prompt_ids(tokenizer, user(p)), 12) for p in prompts]
    with serving(engine, tokenizer) as base:
        compiled = openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(SLOTS) as pool:
            answers = pool.map(
                lambda p: chat(compiled, user(p), max_tokens=12).choices[0].message.content,
                prompts,
            )
            assert list(answers) == expected
    assert engine.compiled is not None and engine.compiled.compile_s > 0


def test_disconnected_streams_free_their_slots(url):
    cancelled = metric(url, "ktinject_requests_total", 0.0, outcome="cancelled")
    body = {
        "messages": user("long answer"),
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=url) as http:
        for _ in range(SLOTS + 2):  # more than the slots: a leak would block the last ones
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
    wait_for_metric(url, "ktinject_kv_slots_in_use", 0)
    assert metric(url, "ktinject_requests_total", outcome="cancelled") > cancelled


def test_a_request_without_stream_whose_client_left_frees_its_slot(model, tokenizer, monkeypatch):
    """Such a request writes nothing until it ends, and its tokens keep coming: the client is
    checked anyway, so the slot is not held until the whole answer is generated."""
    engine = make_engine(model, tokenizer)
    decode = engine.decode_sampled

    def slow(*args, **kwargs):
        time.sleep(0.02)  # 240 tokens: ~5 s, far longer than the check takes
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_sampled", slow)
    body = {"messages": user("long answer"), "max_tokens": 240, "ignore_eos": True}
    with serving(engine, tokenizer) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=body, timeout=0.5)
        wait_for_metric(base, "ktinject_kv_slots_in_use", 0, timeout=2.0)
        assert metric(base, "ktinject_requests_total", outcome="cancelled") == 1
        assert metric(base, "ktinject_generation_tokens_total") < 200


def test_prompts_are_prepared_off_the_event_loop(model, tokenizer, monkeypatch, reference):
    """While one request's prompt is templated and tokenized (held here until released), the
    event loop still answers others: it would hang on /health if tokenizing ran on it."""
    import ktinject.server.app as app_module

    started, release = threading.Event(), threading.Event()
    tokenize = app_module.completion_prompt

    def held(*args):
        started.set()
        assert release.wait(60)
        return tokenize(*args)

    monkeypatch.setattr(app_module, "completion_prompt", held)
    body = {"prompt": "The quick brown fox", "max_tokens": 9, "temperature": 0}
    with (
        serving(make_engine(model, tokenizer), tokenizer) as base,
        concurrent.futures.ThreadPoolExecutor() as pool,
    ):
        pending = pool.submit(httpx.post, f"{base}/v1/completions", json=body, timeout=60)
        try:
            assert started.wait(30)
            assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ok"}
        finally:
            release.set()
        answer = pending.result().json()["choices"][0]["text"]
    assert answer == reference(tokenizer(body["prompt"])["input_ids"], 9)


def test_a_failing_request_does_not_take_the_server_down(model, tokenizer, monkeypatch):
    engine = make_engine(model, tokenizer)
    with serving(engine, tokenizer) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0)

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        def refused(*args, **kwargs):
            raise KtinjectError("not today")

        with monkeypatch.context() as patch:
            patch.setattr(engine, "decode_sampled", broken)  # after the first token: 500 / error
            with pytest.raises(openai.InternalServerError, match="boom"):
                chat(client, user("fail me"), max_tokens=5)
            with pytest.raises(openai.APIError, match="boom"):
                list(chat(client, user("fail me"), max_tokens=5, stream=True))
            patch.setattr(engine, "prefill", refused)  # a plain 400, or the stream's error
            with pytest.raises(openai.BadRequestError, match="not today"):
                chat(client, user("fail me"), max_tokens=5)
            with pytest.raises(openai.APIError, match="not today"):
                list(chat(client, user("fail me"), max_tokens=5, stream=True))
        assert chat(client, user("fine again"), max_tokens=5).choices[0].finish_reason
        assert metric(base, "ktinject_kv_slots_in_use") == 0
        assert metric(base, "ktinject_requests_total", outcome="error") == 4


# -- protocol, auth, metrics ---------------------------------------------------------------------


CHAT_PATH, COMPLETION_PATH = "/v1/chat/completions", "/v1/completions"
X = '"messages": [{"role": "user", "content": "x"}]'


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT_PATH, '{"messages": [', None),
        (CHAT_PATH, f'{{{X}, "max_tokens": "many"}}', "max_tokens"),
        (CHAT_PATH, f'{{{X}, "max_tokens": true}}', "max_tokens"),
        (CHAT_PATH, f'{{{X}, "stream": "yes"}}', "stream"),
        (CHAT_PATH, f'{{{X}, "n": 2}}', "n"),
        (CHAT_PATH, '{"messages": []}', "messages"),
        (CHAT_PATH, '{"max_tokens": 3}', "messages"),
        (CHAT_PATH, f'{{{X}, "temperature": -1}}', "temperature"),
        (CHAT_PATH, f'{{{X}, "temperature": 3}}', "temperature"),
        (CHAT_PATH, f'{{{X}, "seed": {2**64}}}', "seed"),
        (CHAT_PATH, f'{{{X}, "stop": 5}}', "stop"),
        (CHAT_PATH, '{"messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
        (
            CHAT_PATH,
            '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            "messages.0.content",
        ),
        (CHAT_PATH, '{"messages": [{"role": "user", "content": "x \\ud83d y"}]}', "messages"),
        (CHAT_PATH, f'{{{X}, "logprobs": true}}', "logprobs"),
        (CHAT_PATH, f'{{{X}, "tools": [{{"type": "function"}}]}}', "tools"),
        (CHAT_PATH, f'{{{X}, "response_format": {{"type": "json_object"}}}}', "response_format"),
        (COMPLETION_PATH, '{"prompt": [true]}', "prompt"),
        (COMPLETION_PATH, '{"prompt": "x \\udc00"}', "prompt"),
        (COMPLETION_PATH, '{"prompt": "x", "echo": true}', "echo"),
        (COMPLETION_PATH, '{"prompt": "x", "logprobs": 0}', "logprobs"),
        (COMPLETION_PATH, '{"prompt": "x", "best_of": 2}', "best_of"),
    ],
)
def test_bad_requests_are_400_in_openai_format(url, path, body, param):
    response = httpx.post(
        f"{url}{path}", content=body.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_requests_that_are_no_json_object_are_told_what_to_send(url):
    empty = httpx.post(f"{url}{CHAT_PATH}", content=b"")
    assert "body is empty" in empty.json()["error"]["message"]
    form = httpx.post(f"{url}{CHAT_PATH}", data={"messages": "x"})
    assert "application/x-www-form-urlencoded" in form.json()["error"]["message"]
    array = httpx.post(f"{url}{CHAT_PATH}", json=[1])
    assert "is an array, not a JSON object" in array.json()["error"]["message"]
    for response in (empty, form, array):
        assert response.status_code == 400
    missing = httpx.post(f"{url}/v1/chat/completion", json={}).json()["error"]
    assert missing["code"] == "not_found" and f"POST {CHAT_PATH}" in missing["message"]
    wrong = httpx.get(f"{url}{CHAT_PATH}").json()["error"]
    assert wrong["code"] == "method_not_allowed" and "takes POST" in wrong["message"]


def test_a_request_failing_before_it_is_queued_is_a_500_on_an_open_connection(
    model, tokenizer, monkeypatch
):
    import ktinject.server.app as app_module

    def broken(*args):
        raise TypeError("tokenizer trouble")

    monkeypatch.setattr(app_module, "completion_prompt", broken)
    with serving(make_engine(model, tokenizer), tokenizer) as base, httpx.Client() as http:
        failed = http.post(f"{base}{COMPLETION_PATH}", json={"prompt": "x"})
        assert failed.status_code == 500 and "tokenizer trouble" in failed.text
        assert http.get(f"{base}/health").status_code == 200  # the same connection
        assert metric(base, "ktinject_requests_total", outcome="error") == 1


def test_unknown_fields_are_ignored(url):
    body = {"messages": user("x"), "max_tokens": 2, "logit_bias": {}, "user": "me", "frobs": 1}
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 200


def test_api_key_is_required_when_set(model, tokenizer):
    with serving(make_engine(model, tokenizer), tokenizer, api_key="sesame") as base:
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.body["code"] == "invalid_api_key"
        assert httpx.post(f"{base}/v1/completions", content=b"{").status_code == 401
        right = openai.OpenAI(base_url=f"{base}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in right.models.list()] == ["tiny"]
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/openapi.json").status_code == 401
        lower = {"authorization": "bearer sesame"}  # the scheme is case-insensitive
        assert httpx.get(f"{base}/v1/models", headers=lower).status_code == 200


def test_metrics_parse_as_prometheus_text(client, url):
    chat(client, user("count me"), max_tokens=3)
    names = {f.name for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    assert {
        "ktinject_requests",
        "ktinject_prompt_tokens",
        "ktinject_generation_tokens",
        "ktinject_prefix_cache_queries",
        "ktinject_prefix_cache_hits",
        "ktinject_kv_slots_in_use",
        "ktinject_time_to_first_token_seconds",
        "ktinject_time_per_output_token_seconds",
    } <= names
    assert metric(url, "ktinject_kv_slots") == SLOTS
    assert metric(url, "ktinject_requests_total", endpoint="chat.completions", outcome="length")
    assert metric(url, "ktinject_time_to_first_token_seconds_count") > 0


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-9")
    assert caught.value.body["code"] == "model_not_found"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.head(f"{url}/health").status_code == 200


def test_background_server_connections_send_without_waiting_for_acks():
    """Each response is written as headers, then body (an SSE stream chunk by chunk); with
    Nagle's algorithm on, the second write waited ~40 ms for the client's delayed ack."""
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/ping").json() == {"ok": True}
        (connection,) = server.server.server_state.connections
        accepted = connection.transport.get_extra_info("socket")
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# -- command line --------------------------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    """`ktinject serve`'s flags, parsed."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_config_file_is_overridden_by_flags(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("cache-lens: 2048\nport: 9000\nset: [gpu=cuda:1]\nno_prefix_reuse: true\n")
    args = serve_args("--config", str(config), "--port", "9100", "--set", "threads=8")
    options = resolve_options(args)
    assert (options.cache_lens, options.port, options.no_prefix_reuse) == (2048, 9100, True)
    assert options.set == ["gpu=cuda:1", "threads=8"]
    assert (options.host, options.max_batch_size) == ("127.0.0.1", 4)
    config.write_text("cache_lenz: 1\n")
    with pytest.raises(KtinjectError, match="cache_lenz"):
        resolve_options(serve_args("--config", str(config)))


def refuse_load(monkeypatch) -> dict:
    """Make loading the model fail the test; returns where `load`'s keyword arguments go if a
    test lets it be called (it then raises a KtinjectError("loaded"))."""
    seen: dict = {}

    def load(*args, **kwargs):
        seen.update(kwargs)
        raise KtinjectError("loaded")

    monkeypatch.setattr("ktinject.loading.load", load)
    return seen


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00x", " is not UTF-8 text (byte 0xff at offset 0); save the file as UTF-8."),
        (b"cache_lens: [1", " line 1, column 13: malformed YAML (while parsing a flow sequence: "),
        (b"cache-lens: abc\n", ": cache_lens is 'abc'; it must be an integer."),
        (b"set: gpu=cpu\n", ": set is 'gpu=cpu'; it must be a list of KEY=VALUE strings."),
        (b"set: {gpu: cpu}\n", ": set is {'gpu': 'cpu'}; it must be a list"),
        (b"port: null\n", ": port is empty; it must be an integer."),
        (b"max_batch_size: 0\n", ": max_batch_size (--max-batch-size) is 0; it must be at least"),
        (b"api_key: ' '\n", ": api_key (--api-key) is empty; give a key, or leave the key out"),
        (b"cache_lens: ${nope}\n", ": cache_lens cannot be resolved"),
        (b"- port: 1\n", ": expected a mapping of settings"),
        (b"cache_lenz: 1\n", ": 'cache_lenz' is not a setting (closest: cache_lens); valid keys"),
    ],
)
def test_config_file_mistakes_name_the_file_and_key(tmp_path, monkeypatch, content, message):
    refuse_load(monkeypatch)
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    with pytest.raises(KtinjectError) as caught:
        run_serve(serve_args("--config", str(config), "--port", "0"))
    assert str(caught.value).startswith(f"--config {config}{message}")


def test_a_flag_is_named_for_its_own_value_and_wins_over_the_file(tmp_path, monkeypatch):
    refuse_load(monkeypatch)
    config = tmp_path / "c.yaml"
    config.write_text("max_batch_size: 0\ncache_lens: 1\n")
    with pytest.raises(KtinjectError, match=r"^--cache-lens is 0; it must be at least 2\.$"):
        resolve_options(
            serve_args("--config", str(config), "--max-batch-size", "2", "--cache-lens", "0")
        )
    config.write_text("api_key: sk-file\n")  # flags are taken as given, never interpolated
    assert resolve_options(serve_args("--config", str(config), "--api-key", "a${b}")).api_key == (
        "a${b}"
    )


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_refused_rather_than_disabling_auth(monkeypatch, key):
    refuse_load(monkeypatch)
    with pytest.raises(KtinjectError) as caught:
        run_serve(serve_args("--host", "0.0.0.0", "--port", "0", "--api-key", key))
    assert str(caught.value) == (
        "--api-key is empty; give a key, or leave the flag out to serve without one."
    )


def test_serve_takes_the_rule_flags_of_run_and_no_abbreviations(monkeypatch, capsys):
    from ktinject.cli import build_parser

    defaults = resolve_options(serve_args())
    assert (defaults.strict, defaults.allow_external_operators) == (False, False)
    seen = refuse_load(monkeypatch)
    with pytest.raises(KtinjectError, match="loaded"):
        run_serve(serve_args("--strict", "--allow-external-operators", "--port", "0"))
    assert (seen["strict"], seen["allow_external_operators"]) == (True, True)
    args = build_parser(["serve"]).parse_args(["serve", "--strict"])
    assert (args.strict, args.strict_context) == (True, None)
    with pytest.raises(SystemExit):
        build_parser(["serve"]).parse_args(["serve", "--no-prefix"])
    assert "unrecognized arguments: --no-prefix" in capsys.readouterr().err


def test_a_busy_port_is_refused_before_the_model_loads(monkeypatch):
    """Loading (and --compile) can take minutes; a taken port must fail first, in one sentence."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr("ktinject.loading.load", load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(KtinjectError) as caught:
            run_serve(serve_args("--port", str(port)))
    assert f"127.0.0.1:{port}" in str(caught.value) and "--port" in str(caught.value)
    with pytest.raises(KtinjectError, match="--host 'no-such-host.invalid'"):
        bind("no-such-host.invalid", 0)
    with bind("127.0.0.1", 0) as listener:  # port 0: the system picks one, reported from here
        assert listener.getsockname()[1] > 0


# -- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_conversation_reuses_history(smollm2):
    messages = user("What is the capital of France?")

    def two_turns(prefix_reuse: bool):
        engine = Engine(smollm2.model, smollm2.tokenizer, cache_lens=512, num_slots=2)
        app = create_app(engine, smollm2.tokenizer, ServeConfig(prefix_reuse=prefix_reuse))
        with BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
            first = chat(client, messages, max_tokens=12).choices[0].message.content
            follow_up = [*messages, {"role": "assistant", "content": first}, *user("Why?")]
            return first, chat(client, follow_up, max_tokens=12)

    first, reused = two_turns(True)
    _, fresh = two_turns(False)
    assert "Paris" in first
    assert reused.usage.prompt_tokens_details.cached_tokens > 20
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert reused.choices[0].message.content == fresh.choices[0].message.content


def test_a_stream_starts_while_its_prompt_is_prefilled(model, tokenizer, monkeypatch, reference):
    """Headers and the opening chunk do not wait for the first token (held here in prefill)."""
    engine = make_engine(model, tokenizer)
    started, release = threading.Event(), threading.Event()
    prefill = engine.prefill

    def held(*args, **kwargs):
        started.set()
        assert release.wait(60)
        return prefill(*args, **kwargs)

    body = {"prompt": "The quick brown fox", "max_tokens": 9, "temperature": 0, "stream": True}
    with serving(engine, tokenizer) as base:
        monkeypatch.setattr(engine, "prefill", held)  # after the warm-up
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            assert started.wait(30)
            release.set()
            chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(json.loads(chunk[6:])["choices"][0]["text"] for chunk in chunks)
    assert text == reference(tokenizer(body["prompt"])["input_ids"], 9)


class RecordingScheduler:
    """Stands in for the scheduler behind a `Handler`: notes what is queued and dropped."""

    def __init__(self) -> None:
        self.submitted, self.cancelled = [], []
        self.cancelled_one = threading.Event()

    def submit(self, seq) -> None:
        self.submitted.append(seq)

    def cancel(self, seq) -> None:
        self.cancelled.append(seq)
        self.cancelled_one.set()


def recording_handler(model, tokenizer) -> tuple[Handler, RecordingScheduler]:
    """A request handler whose scheduler only records (call `handler.close()` when done)."""
    scheduler = RecordingScheduler()
    engine, metrics = make_engine(model, tokenizer), ServerMetrics(SLOTS)
    return Handler(engine, tokenizer, scheduler, metrics, ServeConfig()), scheduler


def test_a_request_abandoned_while_prepared_is_dropped_once_queued(model, tokenizer):
    """The handler's task can be cancelled (shutdown) while its prompt is being prepared on the
    preparing thread; the request it queues there must not run with nobody reading it."""
    handler, scheduler = recording_handler(model, tokenizer)
    body = ChatCompletionRequest(messages=user("abandon me"), max_tokens=3)
    preparing, release = threading.Event(), threading.Event()

    def prompt_ids() -> list[int]:
        preparing.set()
        assert release.wait(30)
        return chat_prompt_ids(tokenizer, user("abandon me"))

    async def abandon() -> None:
        task = asyncio.create_task(handler._queue(None, body, ChatFormat(), prompt_ids))
        await asyncio.to_thread(preparing.wait, 30)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(abandon())
        assert scheduler.cancelled_one.wait(30)
    finally:
        handler.close()
    assert scheduler.cancelled == scheduler.submitted and len(scheduler.submitted) == 1


def test_a_stream_whose_client_left_before_its_headers_drops_its_request(model, tokenizer):
    """Writing the headers fails (uvicorn raises an OSError once the client is gone), so the
    stream's body never starts: the request must still be dropped, not generate unread."""

    async def gone(message) -> None:
        raise OSError("the client is gone")

    handler, scheduler = recording_handler(model, tokenizer)
    body = ChatCompletionRequest(messages=user("leave early"), max_tokens=3, stream=True)

    async def respond() -> None:
        ids = lambda: chat_prompt_ids(tokenizer, user("leave early"))  # noqa: E731
        response = await handler.handle(None, body, ChatFormat(), ids)
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises(ClientDisconnect):  # Starlette's word for that OSError
            await response(scope, None, gone)

    try:
        asyncio.run(respond())
    finally:
        handler.close()
    assert scheduler.cancelled == scheduler.submitted and len(scheduler.submitted) == 1


def test_text_queued_while_a_chunk_was_sent_goes_out_as_one_chunk():
    """A stream that fell behind (many streams, a slow client) catches up: the deltas already
    queued are merged into one chunk; nothing is lost and the stream still ends properly."""
    from ktinject.server.delivery import Inbox
    from ktinject.server.formats import Reply
    from ktinject.server.handler import RequestEvents
    from ktinject.server.sequence import Delta, Finished, Usage

    async def stream() -> list[str]:
        inbox = Inbox()
        for event in (Delta("a"), Delta("b"), Delta("c"), Finished("stop", Usage(3, 3, 0))):
            inbox.put(event)
        events = RequestEvents(None, None, inbox, None, lambda outcome: None)
        chunks = Handler._stream(None, ChatFormat(), Reply.new("x-", "m"), False, events)
        return [chunk async for chunk in chunks]

    chunks = asyncio.run(stream())
    assert len(chunks) == 4  # opening (role), "abc", finish, [DONE]
    assert '"content":"abc"' in chunks[1] and '"finish_reason":"stop"' in chunks[2]
    assert chunks[3] == "data: [DONE]\n\n"


def drive(scheduler, done) -> None:
    """Run the scheduler's loop on this thread until `done()`."""
    for _ in range(500):
        if done():
            return
        scheduler._take_inbox(block=False)
        scheduler._step()
    raise AssertionError("the scheduler did not get there in 500 steps")


@pytest.mark.parametrize("reuse", [True, False], ids=["prefix-reuse", "no-reuse"])
def test_a_request_dropped_with_a_token_in_flight_leaves_nothing_behind(model, tokenizer, reuse):
    """Decode steps are queued with the previous step's tokens still on the device. A request
    cancelled (or finished) then must not have its pending token fed into the slot's next owner,
    and the next owner's answer must equal a fresh engine's."""
    from ktinject.server.scheduler import Scheduler
    from ktinject.server.sequence import Delta, Sequence

    engine = Engine(model, tokenizer, cache_lens=CACHE_LENS, num_slots=1, chunk_size=CHUNK)
    scheduler = Scheduler(engine, ServerMetrics(1), prefix_reuse=reuse)

    def request(text: str, params: SamplingParams) -> tuple[Sequence, list]:
        events: list = []
        ids = chat_prompt_ids(tokenizer, user(text))
        seq = Sequence(
            ids,
            params,
            tokenizer=tokenizer,
            eos_ids=engine.eos_ids,
            device=engine.device,
            emit=events.append,
        )
        scheduler.submit(seq)
        return seq, events

    first, first_events = request("a long one", SamplingParams(max_new_tokens=60, ignore_eos=True))
    drive(scheduler, lambda: sum(isinstance(e, Delta) for e in first_events) >= 3)
    assert scheduler.in_flight  # its next token is sampled, not yet read
    scheduler.cancel(first)
    params = SamplingParams(max_new_tokens=12)
    second, _ = request("then another", params)
    drive(scheduler, lambda: second.finished)
    assert not scheduler.running and not scheduler.in_flight
    fresh = Engine(model, tokenizer).generate(second.prompt_ids, params)
    fresh.result()
    assert second.completion.token_ids == fresh.token_ids
