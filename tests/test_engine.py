"""Engine behaviour: context checks before compute, cache sizing and reuse, sampling, stopping,
streaming text."""

from __future__ import annotations

import copy
import functools
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from ktinject import optimize
from ktinject.cache import local_cache_lens
from ktinject.detokenize import CLEAN_UP_PROBE, StreamDecoder
from ktinject.engine import Engine
from ktinject.errors import ContextLengthError, KtinjectError
from ktinject.sampling import SamplingParams, draw, sample, top_p_filter
from ktinject.stopping import StopMatcher

PROMPT = [1, 5, 9, 13, 17, 3, 7, 11]


@pytest.fixture(scope="module")
def patched() -> torch.nn.Module:
    model, _ = optimize(tiny_model("llama"), "llama", strict=True)
    return model


def greedy(engine: Engine, prompt: list[int], n: int = 16, **kwargs) -> list[int]:
    generation = engine.generate(prompt, SamplingParams(max_new_tokens=n), **kwargs)
    generation.result()
    return generation.token_ids


def test_prompt_longer_than_cache_is_refused_before_compute(patched) -> None:
    engine = Engine(patched, cache_lens=8)
    with pytest.raises(ContextLengthError) as caught:
        engine.generate(list(range(1, 10)), SamplingParams(max_new_tokens=4))
    message = str(caught.value)
    assert "9 tokens" in message and "8 positions" in message and "--cache-lens" in message
    assert engine.cached_length(0) == 0


def test_prompt_plus_new_tokens_over_cache_names_both_flags(patched) -> None:
    engine = Engine(patched, cache_lens=16)
    with pytest.raises(ContextLengthError) as caught:
        engine.generate(PROMPT, SamplingParams(max_new_tokens=9))
    message = str(caught.value)
    assert "8 tokens" in message and "9 new tokens" in message and "17 in all" in message
    assert "--max-new-tokens" in message and "at most 8" in message
    assert greedy(engine, PROMPT, 8)  # exactly fits: works


def test_dynamic_cache_model_is_bounded_by_its_context_window() -> None:
    engine = Engine(tiny_model("llama", max_position_embeddings=12))
    with pytest.raises(ContextLengthError, match="context window is 12 positions"):
        engine.generate(PROMPT, SamplingParams(max_new_tokens=5))


@pytest.mark.parametrize("rules", ["llama", None], ids=["static", "unpatched"])
def test_a_cache_past_the_context_window_is_cut_to_it_and_says_so(rules) -> None:
    """A model with learned positions (GPT-2's) failed on an index past its window; a RoPE
    model's cache past it could only be filled with positions it was not trained for."""
    model = tiny_model("llama", max_position_embeddings=64)
    if rules:
        model, _ = optimize(model, rules)
    engine = Engine(model, cache_lens=100)
    assert engine.cache_lens == 64
    assert any("--cache-lens 100 is past the model's context window" in n for n in engine.notes())
    with pytest.raises(ContextLengthError, match="context window is 64 positions"):
        engine.generate(list(range(1, 60)), SamplingParams(max_new_tokens=10))


def test_a_cache_larger_than_free_memory_is_one_sentence(patched) -> None:
    """Before any allocation, and before the bookkeeping of a billion slots."""
    with pytest.raises(KtinjectError, match=r"needs [\d,.]+ GiB on cpu.*lower --cache-lens or"):
        Engine(patched, cache_lens=64, num_slots=10**9)
    huge = optimize(tiny_model("llama", max_position_embeddings=10**12), "llama")[0]
    with pytest.raises(KtinjectError, match="GiB is free there; lower --cache-lens[.]"):
        Engine(huge, cache_lens=10**11)
    with pytest.raises(KtinjectError, match="shorten the prompt or lower --max-new-tokens"):
        Engine(huge).reserve(10, 10**11)


def test_local_mode_sizes_cache_in_pages(patched) -> None:
    engine = Engine(patched)
    greedy(engine, PROMPT, 4)
    assert engine.cache_lens == 256
    assert local_cache_lens(300, 10) == 512
    assert local_cache_lens(1, 1) == 256


def test_local_cache_grows_without_losing_state(patched) -> None:
    engine = Engine(patched)
    engine.prefill(0, PROMPT)
    kept = engine.cache.kv[0][0][0, :, : len(PROMPT)].clone()
    engine.reserve(len(PROMPT), 300)
    assert engine.cache_lens == 512
    torch.testing.assert_close(engine.cache.kv[0][0][0, :, : len(PROMPT)], kept)
    assert engine.cached_tokens(0) == PROMPT


def test_history_reuse_prefills_only_the_suffix_and_gives_the_same_tokens(patched) -> None:
    fresh = greedy(Engine(patched, cache_lens=64), PROMPT + [2, 4, 6], 8)
    engine = Engine(patched, cache_lens=64)
    greedy(engine, PROMPT, 8)
    generation = engine.generate(PROMPT + [2, 4, 6], SamplingParams(max_new_tokens=8), reuse=True)
    generation.result()
    assert generation.stats.cached_tokens == len(PROMPT)
    assert generation.token_ids == fresh


def test_reuse_of_identical_prompt_recomputes_at_least_one_token(patched) -> None:
    engine = Engine(patched, cache_lens=64)
    first = greedy(engine, PROMPT, 4)
    generation = engine.generate(PROMPT, SamplingParams(max_new_tokens=4), reuse=True)
    generation.result()
    assert generation.stats.cached_tokens == len(PROMPT) - 1
    assert generation.token_ids == first


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_slots_decode_together_like_one_at_a_time(patched, compiled: bool, with_native) -> None:
    """Rows of different lengths in one step; compiled, the step is one torch.compile graph whose
    attention reads each row's length (C kernel) or up to the longest row (torch: a symbolic
    size) and masks the shorter one."""
    other = [2, 4, 6, 8, 10]
    expected = [greedy(Engine(patched), p, 6) for p in (PROMPT, other)]
    engine = Engine(patched, cache_lens=64, num_slots=2, compile=compiled)
    assert (engine.compiled is not None) == compiled
    logits = [engine.prefill(0, PROMPT)[0], engine.prefill(1, other)[0]]
    tokens = [[int(logit.argmax())] for logit in logits]
    for _ in range(5):
        step = engine.decode([0, 1], [tokens[0][-1], tokens[1][-1]])
        for row in range(2):
            tokens[row].append(int(step[row].argmax()))
    assert tokens == expected


def test_each_engine_compiles_into_a_cache_of_its_own(patched) -> None:
    """Dynamo keeps at most 8 graphs per code object; a test run compiles more models than that
    (seen in CI: a hard failure on the 9th)."""
    first, second = Engine(patched, compile=True), Engine(patched, compile=True)
    assert first.compiled.function.__code__ is not second.compiled.function.__code__


def test_compiled_decode_follows_a_growing_local_cache(patched) -> None:
    """Local mode re-allocates a larger cache for a longer prompt; the compiled step (one graph,
    the cache length symbolic) keeps giving eager's tokens."""
    long_prompt = [i % 200 + 1 for i in range(300)]
    eager, compiled = Engine(patched), Engine(patched, compile=True)
    for prompt in (PROMPT, long_prompt):
        assert greedy(compiled, prompt, 6) == greedy(eager, prompt, 6)
    assert compiled.cache.cache_lens == 512


def test_compiled_decode_compiles_once_for_warm_up_and_generation(patched) -> None:
    """warm_up compiles the step from host ids; generation feeds ids sampled on the device
    outside inference mode. A guard on that difference recompiled the step at the first
    generated token: `ktinject run --compile` spent the ~10 s of a second compile inside its
    decode time and reported 3.6 tok/s instead of ~73 (Q4 rules, 2-core EPYC, 2026-11-29)."""
    engine = Engine(patched, compile=True)
    engine.warm_up()
    # (config.patch: monkeypatch would delete the option on undo, breaking later compiles)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert len(greedy(engine, PROMPT, 4)) == 4
        # a longer prompt grows the local cache (from `generate`; warm-up's from `prefill`)
        assert len(greedy(engine, [i % 200 + 1 for i in range(300)], 4)) == 4
    assert engine.cache.cache_lens == 512


def test_compiling_during_a_generation_is_kept_out_of_its_rates(patched) -> None:
    """One-time work a generation pays (compiling the step here; on a GPU capturing its graph)
    is reported apart: the rates say how fast the model runs (`ktinject run` on an H200 would
    otherwise show ~1 s of capture as a decode rate of ~100 tok/s)."""
    from ktinject.cli import status_line

    engine = Engine(patched, compile=True)  # no warm-up: the first decode step compiles
    generation = engine.generate(PROMPT, SamplingParams(max_new_tokens=4))
    generation.result()
    stats = generation.stats
    assert stats.setup_s == pytest.approx(engine.compiled.compile_s)
    assert 0 < stats.decode_s < stats.setup_s
    assert f"warm-up {stats.setup_s:.1f} s, not in the rates" in status_line(stats)


def test_max_new_tokens_finishes_with_length(patched) -> None:
    generation = Engine(patched).generate(PROMPT, SamplingParams(max_new_tokens=3))
    generation.result()
    assert len(generation.token_ids) == 3
    assert generation.stats.finish_reason == "length"


def test_eos_finishes_with_stop_and_is_not_emitted() -> None:
    model = tiny_model("llama")
    first = greedy(Engine(model), PROMPT, 3)
    model.generation_config.eos_token_id = first[2]
    generation = Engine(model).generate(PROMPT, SamplingParams(max_new_tokens=10))
    generation.result()
    assert generation.token_ids == first[:2]
    assert generation.stats.finish_reason == "stop"


def step_by_step(engine: Engine, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens through `decode` with host ids: the plain loop `generate` overlaps."""
    logits, _ = engine.prefill(0, prompt, reuse=False)
    tokens = [int(logits.argmax())]
    while len(tokens) < n:
        tokens.append(int(engine.decode([0], [tokens[-1]])[0].argmax()))
    return tokens


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_generate_feeds_device_sampled_tokens_like_host_ids(patched, compiled: bool) -> None:
    """`generate` queues each step with the token still on the device (decode_sampled) and reads
    it while the step runs; the tokens and the cache are those of the plain loop."""
    engine = Engine(patched, cache_lens=64, compile=compiled)
    expected = step_by_step(engine, PROMPT, 6)
    assert greedy(engine, PROMPT, 6) == expected
    # the length limit is known ahead: no step is queued for the last token
    assert engine.cached_length(0) == len(PROMPT) + 5
    assert engine.cached_tokens(0) == PROMPT + expected[:5]


def test_a_token_that_ends_the_generation_stays_cached_and_valid() -> None:
    """The step queued for the end-of-sequence token before it was read is not wasted: its K/V
    is cached and counted, so a next turn reuses it and decodes as if it had been prefilled."""
    model, _ = optimize(tiny_model("llama"), "llama", strict=True)
    first = greedy(Engine(model), PROMPT, 4)
    model.generation_config.eos_token_id = first[2]
    engine = Engine(model, cache_lens=64)
    assert greedy(engine, PROMPT, 10) == first[:2]
    assert engine.cached_tokens(0) == PROMPT + first[:3]
    follow_up = PROMPT + first[:3] + [7, 8]
    reused = engine.generate(follow_up, SamplingParams(max_new_tokens=4), reuse=True)
    reused.result()
    assert reused.stats.cached_tokens == len(follow_up) - 2
    fresh = Engine(model, cache_lens=64).generate(follow_up, SamplingParams(max_new_tokens=4))
    fresh.result()
    assert reused.token_ids == fresh.token_ids


def test_seeded_sampling_is_reproducible(patched) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    runs = []
    for _ in range(2):
        generation = Engine(patched).generate(PROMPT, params)
        generation.result()
        runs.append(generation.token_ids)
    assert runs[0] == runs[1]


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(4, 100)
    params = SamplingParams(temperature=1.0, top_k=1)
    assert torch.equal(sample(logits, params), logits.argmax(-1))


def test_tiny_top_p_keeps_only_the_best_token() -> None:
    logits = torch.randn(4, 100)
    params = SamplingParams(temperature=1.0, top_p=1e-6)
    assert torch.equal(sample(logits, params), logits.argmax(-1))


def test_draw_follows_the_probabilities() -> None:
    probs = torch.tensor([[0.1, 0.0, 0.2, 0.7]]).expand(40_000, -1)
    picks = draw(probs, torch.Generator().manual_seed(0))
    frequency = torch.bincount(picks, minlength=4) / len(picks)
    torch.testing.assert_close(frequency, probs[0], atol=0.01, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.0, 1e-30, 0.3, 1.0, 7.0]), min_size=1, max_size=40).filter(
        lambda w: sum(w) > 0
    ),
    uniform=st.sampled_from([0.0, 0.5, 1.0 - 2.0**-53, None]),
)
def test_draw_never_picks_an_entry_of_probability_zero(
    weights: list[float], uniform: float | None
) -> None:
    """Top-k / top-p leave zeros in the distribution. Also with the extreme draws (0, just below
    1); a draw of 0 lands on the first entry that can be chosen."""
    probs = torch.tensor([weights], dtype=torch.float32).expand(64, -1) / sum(weights)
    generator = torch.Generator().manual_seed(len(weights))
    if uniform is None:
        picks = draw(probs, generator).tolist()
    else:
        fixed = lambda shape, generator, **kw: torch.full(shape, uniform, **kw)  # noqa: E731
        with mock.patch.object(torch, "rand", fixed):
            picks = draw(probs, generator).tolist()
    possible = [i for i, p in enumerate(probs[0].tolist()) if p > 0]
    assert set(picks) <= set(possible)
    if uniform == 0.0:
        assert set(picks) == {possible[0]}


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -1)],
)
def test_bad_sampling_params_name_the_value(field: str, value: float) -> None:
    with pytest.raises(KtinjectError, match=field):
        SamplingParams(**{field: value})


@settings(max_examples=50, deadline=None)
@given(
    text=st.text(alphabet="ab\n<>", max_size=30),
    stop=st.text(alphabet="ab\n<>", min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=6),
)
def test_stop_matcher_emits_exactly_the_text_before_the_stop(text, stop, cuts) -> None:
    matcher = StopMatcher([stop])
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    out = ""
    for a, b in zip(bounds, bounds[1:], strict=False):
        piece, stopped = matcher.feed(text[a:b])
        out += piece
        if stopped:
            break
    out += matcher.flush()
    expected = text[: text.find(stop)] if stop in text else text
    assert out == expected


def test_stream_decoder_never_splits_multibyte_characters(smollm2) -> None:
    tokenizer = smollm2.tokenizer
    text = "naïve café — 東京 🙂 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


@settings(max_examples=60)
@given(text=st.text(max_size=40), specials=st.lists(st.integers(0, 40), max_size=3))
def test_stream_decoder_gives_decode_text_in_rust_and_in_python(smollm2, text, specials) -> None:
    """The Rust stream (fast tokenizers) and the Python window give `decode`'s whole text, with
    special tokens skipped, and never a piece ending in half a character."""
    tokenizer = smollm2.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for at in specials:
        ids.insert(min(at, len(ids)), 2)  # <|im_end|>
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    rust, python = StreamDecoder(tokenizer), StreamDecoder(tokenizer)
    python.stream = None
    assert rust.stream is not None
    for decoder in (rust, python):
        pieces = [decoder.push(i) for i in ids]
        assert all(not piece.endswith("\ufffd") for piece in pieces) or "\ufffd" in expected
        assert "".join(pieces) + decoder.flush() == expected


@pytest.mark.parametrize("clean_up", [True, False])
def test_stream_decoder_leaves_a_decode_that_cleans_up_spaces_to_python(clean_up) -> None:
    """transformers rewrites " ." to "." after a word-level model's decode when asked to; the
    Rust stream would not, so such a tokenizer keeps the Python window."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", *CLEAN_UP_PROBE.split()]
    model = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", clean_up_tokenization_spaces=clean_up
    )
    decoder = StreamDecoder(tokenizer)
    assert (decoder.stream is None) == clean_up
    ids = tokenizer("a . b ? c", add_special_tokens=False)["input_ids"]
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids)


def test_engine_rejects_bad_sizes(patched) -> None:
    with pytest.raises(KtinjectError, match="chunk_size"):
        Engine(patched, chunk_size=0)
    with pytest.raises(KtinjectError, match="cache_lens"):
        Engine(patched, cache_lens=1)


def test_empty_prompt_is_refused(patched) -> None:
    with pytest.raises(KtinjectError, match="empty"):
        Engine(copy.deepcopy(patched)).prefill(0, [])


@pytest.mark.parametrize("cache_lens", [None, 64])
def test_token_ids_outside_the_vocabulary_are_refused(patched, cache_lens: int | None) -> None:
    """One sentence, before any compute (on a GPU the embedding's device-side assert would
    leave the CUDA context unusable); what the slot held stays reusable."""
    engine = Engine(copy.deepcopy(patched), cache_lens=cache_lens)
    vocab = patched.get_input_embeddings().weight.shape[0]
    engine.prefill(0, [1, 2, 3])
    for bad in (vocab, -1):
        with pytest.raises(KtinjectError, match=f"Token id {bad} is outside .*\\[0, {vocab}\\)"):
            engine.prefill(0, [1, 2, 3, bad])
        with pytest.raises(KtinjectError, match=f"Token id {bad}"):
            engine.decode([0], [bad])
    assert engine.cached_tokens(0) == [1, 2, 3]
    assert engine.prefill(0, [1, 2, 3, 4])[1] == 3  # the history is still reused


@pytest.mark.parametrize("cache_lens", [None, 8, 64])
def test_warm_up_leaves_every_slot_empty(patched, cache_lens: int | None) -> None:
    engine = Engine(patched, cache_lens=cache_lens, num_slots=2)
    engine.warm_up()
    assert [engine.cached_length(slot) for slot in range(2)] == [0, 0]
    assert greedy(engine, PROMPT[:4], 3) == greedy(Engine(patched), PROMPT[:4], 3)


def test_decode_before_any_prefill_starts_at_position_zero(patched) -> None:
    engine = Engine(patched)
    logits = engine.decode([0], [PROMPT[0]])
    expected, _ = Engine(patched).prefill(0, PROMPT[:1])
    torch.testing.assert_close(logits[0], expected)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mixtral", "deepseek_v3"])
def test_compiled_decode_of_other_families_matches_eager(arch: str) -> None:
    """Qwen2 (q/k/v bias), Qwen3 (per-head q/k norms), Mixtral (gathered experts) and DeepSeek-V3
    (MLA latent cache, gathered experts) through the compiled step."""
    from ktinject.loading import rules_for

    model, _ = optimize(tiny_model(arch), rules_for(arch), strict=True)
    assert greedy(Engine(model, compile=True), PROMPT, 8) == greedy(Engine(model), PROMPT, 8)


def test_compile_is_refused_with_a_reason_for_hugging_face_experts() -> None:
    keep_hf_experts = {
        "extends": "mixtral.yaml",
        "rules": [{"match": {"name": r"\.experts$"}, "replace": {"class": "default"}}],
    }
    model, _ = optimize(tiny_model("mixtral"), keep_hf_experts, strict=True)
    engine = Engine(model, compile=True)
    assert engine.compiled is None
    assert "MoE experts" in engine.compile_blocked_by


def test_rows_sample_together_as_each_would_alone() -> None:
    """The server samples a batch at once: greedy rows in one argmax, other rows with their own
    settings and seeded generators, exactly as each request would on its own."""
    from ktinject.completion import Completion, sample_rows

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def completions() -> list[Completion]:
        settings = [
            SamplingParams(),
            SamplingParams(temperature=0.8, top_p=0.9, seed=3),
            SamplingParams(temperature=1.2, top_k=5, seed=4),
        ]
        cpu = torch.device("cpu")
        return [Completion(p, tokenizer=None, eos_ids=set(), device=cpu) for p in settings]

    together = sample_rows(completions(), logits)
    alone = [c.sample_on_device(row)[0] for c, row in zip(completions(), logits, strict=True)]
    assert together.tolist() == [int(t) for t in alone]
    assert together[0] == logits[0].argmax()


def test_rows_with_the_same_settings_are_drawn_with_one_set_of_kernels() -> None:
    """Unseeded rows sharing their settings are sampled in one batched call (each op is a kernel
    launch on a GPU), between greedy and seeded rows that keep theirs; each row's token is one
    its own settings allow."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ktinject.completion import Completion, sample_rows

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    cpu = torch.device("cpu")
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    top5 = SamplingParams(temperature=0.9, top_k=5)

    def ops(settings: list[SamplingParams]) -> tuple[int, torch.Tensor]:
        rows = [Completion(p, tokenizer=None, eos_ids=set(), device=cpu) for p in settings]
        with CountOps() as counter:
            tokens = sample_rows(rows, logits[: len(settings)])
        return counter.ops, tokens

    one, _ = ops([top5])
    eight, tokens = ops([top5] * 8)
    assert eight == one
    allowed = logits.topk(5, dim=-1).indices
    assert all(t in allowed[row] for row, t in enumerate(tokens.tolist()))

    seeded = SamplingParams(temperature=0.7, seed=5)
    mixed = [SamplingParams(), top5, seeded, top5, SamplingParams(), top5]
    _, tokens = ops(mixed)
    assert tokens[0] == logits[0].argmax() and tokens[4] == logits[4].argmax()
    alone = Completion(seeded, tokenizer=None, eos_ids=set(), device=cpu)
    assert tokens[2] == alone.sample_on_device(logits[2])[0]
    assert all(tokens[row] in allowed[row] for row in (1, 3, 5))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    spread=st.sampled_from([0.5, 3.0, 12.0]),
    top_p=st.sampled_from([0.05, 0.5, 0.9, 0.99]),
)
def test_top_p_from_a_partial_sort_equals_the_full_sort(
    seed: int, spread: float, top_p: float
) -> None:
    """On a CPU top-p orders only the best entries when they hold enough of the mass (flat rows
    fall back to the full sort); either way the same entries survive."""
    scores = torch.randn(4, 3000, generator=torch.Generator().manual_seed(seed)) * spread
    probs = scores.softmax(dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered
    expected = torch.full_like(scores, float("-inf"))
    for row in range(len(scores)):
        keep = order[row][before[row] < top_p]
        expected[row, keep] = scores[row, keep]
    assert torch.equal(top_p_filter(scores, top_p), expected)


@functools.cache
def bookkeeping_engine() -> Engine:
    """An engine (dynamic cache) whose token lists tests set directly."""
    return Engine(tiny_model("llama"))


@settings(max_examples=200, deadline=None)
@given(
    common=st.lists(st.integers(0, 3), max_size=40),
    cached_tail=st.lists(st.integers(0, 3), max_size=10),
    prompt_tail=st.lists(st.integers(0, 3), max_size=10),
)
def test_shared_prefix_is_the_longest_common_start(
    common: list[int], cached_tail: list[int], prompt_tail: list[int]
) -> None:
    engine = bookkeeping_engine()
    engine.dynamic_tokens[0] = [*common, *cached_tail]
    prompt = [*common, *prompt_tail]
    expected = 0
    while expected < min(len(prompt), len(engine.dynamic_tokens[0])) and (
        prompt[expected] == engine.dynamic_tokens[0][expected]
    ):
        expected += 1
    assert engine.shared_prefix(0, prompt) == expected
