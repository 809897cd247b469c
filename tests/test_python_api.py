"""The Python API on bad or unusual input: every mistake is one sentence (a `KtinjectError`) at
the call, never a raw exception from deep inside, corrupted cache state or silently wrong output;
legal but extreme values (a tiny temperature or top_p) work."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from assertions import one_sentence
from tiny_models import tiny_config, tiny_model

from ktinject import optimize
from ktinject.engine import Engine
from ktinject.errors import ContextLengthError, KtinjectError, RuleError
from ktinject.loading import build_on_meta
from ktinject.sampling import SamplingParams, draw, sample

PROMPT = [1, 5, 9, 13]
RMS_NORM_RULE = {"match": {"class": "LlamaRMSNorm"}, "replace": {"class": "operators.norm.RMSNorm"}}


@pytest.fixture(scope="module")
def patched() -> torch.nn.Module:
    model, _ = optimize(tiny_model("llama"), "llama", strict=True)
    return model


@pytest.fixture
def engine(patched) -> Engine:
    """A static-cache engine with two slots."""
    return Engine(patched, cache_lens=32, num_slots=2)


@pytest.fixture(scope="module")
def dynamic() -> torch.nn.Module:
    """A model without rules (Hugging Face's DynamicCache) and a 12-position context window."""
    return tiny_model("llama", max_position_embeddings=12)


def tokens(engine: Engine, prompt: Any, params: SamplingParams | None = None, **kw) -> list[int]:
    generation = engine.generate(prompt, params or SamplingParams(max_new_tokens=4), **kw)
    generation.result()
    return generation.token_ids


# -- sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [256, 49_152])  # below and past the CPU's top-p candidates
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=5e-324),
        SamplingParams(temperature=1.0, top_p=1e-50),
        SamplingParams(temperature=0.7, top_p=1e-300, top_k=5),
    ],
)
def test_extreme_temperature_or_top_p_samples_the_best_token(
    vocab: int, params: SamplingParams
) -> None:
    """Legal OpenAI values: logits / 1e-40 overflow, a top_p of 1e-50 is 0 in float32. Both
    used to make the softmax NaN and the draw return id `vocab`."""
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)) * 3
    picks = sample(logits, params, torch.Generator().manual_seed(1))
    assert torch.equal(picks, logits.argmax(-1))


def test_sampling_at_temperature_one_draws_from_the_softmax_as_before() -> None:
    """Scaling relative to the best entry changes nothing at temperature 1 (x - max is what the
    softmax computes anyway): a seed draws the same tokens as a plain softmax draw."""
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(2)) * 4
    params = SamplingParams(temperature=1.0, seed=3)
    picks = sample(logits, params, torch.Generator().manual_seed(3))
    assert torch.equal(picks, draw(logits.softmax(-1), torch.Generator().manual_seed(3)))


def test_generation_with_a_tiny_temperature_is_greedy(engine: Engine) -> None:
    greedy = tokens(engine, PROMPT)
    assert tokens(engine, PROMPT, SamplingParams(max_new_tokens=4, temperature=1e-40)) == greedy


# -- SamplingParams ------------------------------------------------------------------------------


def test_a_single_stop_string_is_one_stop_string() -> None:
    assert SamplingParams(stop="xyz .").stop == ["xyz ."]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_numpy_integers_are_accepted_as_counts_and_seeds() -> None:
    params = SamplingParams(max_new_tokens=np.int64(3), seed=np.int32(5), top_k=np.int16(2))
    assert (params.max_new_tokens, params.seed, params.top_k) == (3, 5, 2)
    assert type(params.seed) is int


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("max_new_tokens", 2.5, "must be an integer"),
        ("max_new_tokens", float("inf"), "must be an integer"),
        ("max_new_tokens", "10", "must be an integer"),
        ("max_new_tokens", True, "must be an integer"),
        ("top_k", 2.5, "must be an integer"),
        ("top_k", None, "must be an integer"),
        ("seed", 1.5, "must be an integer"),
        ("seed", True, "must be an integer"),
        ("temperature", "0.7", "must be a number"),
        ("temperature", None, "must be a number"),
        ("top_p", "0.9", "must be a number"),
        ("stop", [1], "list of strings"),
        ("ignore_eos", "no", "True or False"),
    ],
)
def test_sampling_params_of_the_wrong_type_are_one_sentence(
    field: str, value: Any, fragment: str
) -> None:
    with pytest.raises(KtinjectError) as caught:
        SamplingParams(**{field: value})
    one_sentence(caught.value, f"{field} is {value!r}", fragment)


# -- Engine arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"num_slots": 0}, ("num_slots is 0", "at least 1")),
        ({"num_slots": -1}, ("num_slots is -1", "at least 1")),
        ({"num_slots": 2.0}, ("num_slots is 2.0", "integer")),
        ({"cache_lens": 64.5}, ("cache_lens is 64.5", "integer")),
        ({"cache_lens": "64"}, ("cache_lens is '64'", "integer")),
        ({"chunk_size": 2.5}, ("chunk_size is 2.5", "integer")),
        ({"compile": "no"}, ("compile is 'no'", "True or False")),
        ({"cuda_graph": None}, ("cuda_graph is None", "True or False")),
    ],
)
def test_bad_engine_settings_are_one_sentence(patched, kwargs: dict, fragments: tuple) -> None:
    with pytest.raises(KtinjectError) as caught:
        Engine(patched, **kwargs)
    one_sentence(caught.value, *fragments)


def test_a_number_in_the_tokenizer_place_says_to_pass_settings_by_keyword(patched) -> None:
    with pytest.raises(KtinjectError) as caught:
        Engine(patched, 64)
    one_sentence(caught.value, "tokenizer is 64", "cache_lens=")


@pytest.mark.parametrize("model", ["path/to/model", None])
def test_an_engine_needs_a_model(model: Any) -> None:
    with pytest.raises(KtinjectError) as caught:
        Engine(model)
    one_sentence(caught.value, f"model is {model!r}", "causal LM")


def test_an_engine_refuses_a_model_whose_weights_are_on_meta() -> None:
    with pytest.raises(KtinjectError) as caught:
        Engine(build_on_meta(tiny_config("llama"), torch.float32))
    one_sentence(caught.value, "meta device", "load them first")


# -- prompts and token ids -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        (1, 5, 9, 13),
        np.array(PROMPT),
        [np.int64(t) for t in PROMPT],
        torch.tensor(PROMPT),
        torch.tensor([PROMPT]),  # tokenizer(text, return_tensors="pt").input_ids
    ],
    ids=["tuple", "numpy", "numpy-ints", "tensor", "tensor-1xT"],
)
def test_prompts_as_arrays_and_tensors_generate_as_lists_do(engine: Engine, prompt: Any) -> None:
    expected = tokens(engine, PROMPT)
    engine.reset(0)
    assert tokens(engine, prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ("hello", "'hello' (str)"),
        (None, "None"),
        ([[1, 2, 3]], "[[1, 2, 3]]"),
        ([1.5, 2, 3], "[1.5, 2, 3]"),
        ([True, False], "[True, False]"),
        ({"input_ids": [1, 2]}, "(dict)"),
    ],
)
def test_prompts_that_are_not_token_ids_are_refused_at_the_call(
    engine: Engine, prompt: Any, fragment: str
) -> None:
    with pytest.raises(KtinjectError) as caught:
        engine.generate(prompt, SamplingParams())
    one_sentence(caught.value, fragment, "list of token ids", "tokenizer(text)['input_ids']")


@pytest.mark.parametrize(
    "prompt", [torch.tensor([1.0, 2.0]), torch.tensor([[1, 2], [3, 4]]), np.array([1.5, 2.0])]
)
def test_float_or_batched_arrays_are_refused(engine: Engine, prompt: Any) -> None:
    with pytest.raises(KtinjectError) as caught:
        engine.prefill(0, prompt)
    one_sentence(caught.value, "token_ids is")


def test_generate_without_params_is_greedy_with_the_default_length(patched) -> None:
    engine = Engine(patched, cache_lens=512)
    generation = engine.generate(PROMPT)
    generation.result()
    assert generation.token_ids == tokens(engine, PROMPT, SamplingParams())


def test_an_empty_prompt_is_refused_at_the_call(engine: Engine) -> None:
    with pytest.raises(KtinjectError) as caught:
        engine.generate([], SamplingParams())  # not only when iterated
    one_sentence(caught.value, "prompt_ids is empty")


def test_float_token_ids_are_never_truncated(engine: Engine) -> None:
    engine.prefill(0, [1, 2])
    with pytest.raises(KtinjectError) as caught:
        engine.decode([0], [5.7])
    one_sentence(caught.value, "[5.7]", "list of token ids")
    assert engine.cached_tokens(0) == [1, 2]


@pytest.mark.parametrize("params", [{"max_new_tokens": 3}, 3])
def test_params_must_be_sampling_params(engine: Engine, params: Any) -> None:
    with pytest.raises(KtinjectError) as caught:
        engine.generate(PROMPT, params)
    one_sentence(caught.value, f"params is {params!r}", "SamplingParams(")


# -- slots and decode steps ----------------------------------------------------------------------


@pytest.mark.parametrize("slot", [2, -1, True, 1.0, "0"])
@pytest.mark.parametrize(
    "call",
    [
        lambda e, s: e.generate(PROMPT, SamplingParams(), slot=s),
        lambda e, s: e.prefill(s, PROMPT),
        lambda e, s: e.decode([s], [5]),
        lambda e, s: e.reset(s),
        lambda e, s: e.cached_length(s),
    ],
    ids=["generate", "prefill", "decode", "reset", "cached_length"],
)
def test_a_slot_out_of_range_is_one_sentence(engine: Engine, slot: Any, call: Any) -> None:
    """A negative slot would wrap around to another sequence's cache."""
    engine.prefill(1, [7, 8])
    with pytest.raises(KtinjectError) as caught:
        call(engine, slot)
    one_sentence(caught.value, f"slot {slot!r}", "0 to 1", "num_slots")
    assert engine.cached_tokens(1) == [7, 8]


@pytest.mark.parametrize("dynamic_cache", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize(
    ("slots", "ids", "fragment"),
    [
        ([0, 0], [5, 6], "slot 0 appears more than once"),
        ([0, 1], [5], "2 slot(s) and 1 token id(s)"),
        ([0], [5, 6], "1 slot(s) and 2 token id(s)"),
    ],
)
def test_a_bad_decode_step_changes_no_slot(
    patched, dynamic, dynamic_cache: bool, slots: list, ids: list, fragment: str
) -> None:
    """A slot given twice wrote both tokens at one position (silently); lengths that differ
    failed half-way through a dynamic-cache step."""
    engine = Engine(dynamic if dynamic_cache else patched, cache_lens=None, num_slots=2)
    engine.prefill(0, [1, 2])
    with pytest.raises(KtinjectError) as caught:
        engine.decode(slots, ids)
    one_sentence(caught.value, fragment)
    assert engine.cached_tokens(0) == [1, 2] and engine.cached_length(1) == 0


class Letters:
    """A tokenizer stand-in whose every token reads as one letter, so each step yields text."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_a_generation_whose_slot_another_call_took_stops_with_a_sentence(
    cache: str, patched, dynamic
) -> None:
    """Two generations interleaved on one slot would each decode from the other's cache; the
    one resumed after the other took the slot refuses, and a generation on its own slot, run
    to the end alone, is unaffected."""
    model, settings = (patched, {"cache_lens": 32}) if cache == "static" else (dynamic, {})
    engine = Engine(model, Letters(), **settings)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = engine.generate(PROMPT, params)
    list(alone)
    first, second = engine.generate(PROMPT, params), engine.generate([2, 4, 6], params)
    taken = iter(first)
    next(taken)  # prefilled, decoding
    list(second)
    with pytest.raises(KtinjectError) as error:
        next(taken)
    one_sentence(error.value, "Slot 0 was changed by another call", "slot=N")
    again = engine.generate(PROMPT, params)
    list(again)
    assert again.token_ids == alone.token_ids


def test_dynamic_cache_decode_past_the_context_window_is_a_context_error(dynamic) -> None:
    engine = Engine(dynamic)
    engine.prefill(0, list(range(1, 12)))
    engine.decode([0], [5])  # the window's last position
    with pytest.raises(ContextLengthError) as caught:
        engine.decode([0], [6])
    one_sentence(caught.value, "context window is 12 positions")
    assert engine.cached_length(0) == 12


# -- optimize ------------------------------------------------------------------------------------


def test_a_rule_may_not_move_loaded_weights_to_meta() -> None:
    model = tiny_model("llama")
    rule = {"match": {"name": "^lm_head$"}, "replace": {"class": "default", "device": "meta"}}
    with pytest.raises(RuleError) as caught:
        optimize(model, [rule])
    one_sentence(caught.value, "device 'meta'", "lm_head", "replace.device")
    assert not model.lm_head.weight.is_meta


def test_a_rule_may_place_a_model_built_on_meta_on_meta() -> None:
    model = build_on_meta(tiny_config("llama"), torch.float32)
    rule = {"match": {"name": "^lm_head$"}, "replace": {"class": "default", "device": "meta"}}
    _, report = optimize(model, [rule])
    assert [r.name for r in report.replacements] == ["lm_head"]


def test_optimizing_twice_says_the_model_is_already_optimized() -> None:
    model, _ = optimize(tiny_model("llama"), "llama")
    with pytest.raises(RuleError) as caught:
        optimize(model, "llama", strict=True)
    one_sentence(caught.value, "already optimized", "llama.yaml", "freshly loaded model")


def test_a_model_optimized_without_replacements_may_be_optimized() -> None:
    model, _ = optimize(tiny_model("llama"), None)
    assert optimize(model, "llama")[1].replacements


def test_auto_rules_pick_the_shipped_file_of_the_model_type() -> None:
    _, report = optimize(tiny_model("llama"), "auto", strict=True)
    assert [Path(s).name for s in report.sources] == ["llama.yaml"]


def test_rules_as_a_tuple_are_a_list_of_rules() -> None:
    _, report = optimize(tiny_model("llama"), (RMS_NORM_RULE,))
    assert {r.operator for r in report.replacements} == {"RMSNorm"}


@pytest.mark.parametrize(
    ("rules", "fragment"),
    [
        ("", "'' is an empty name"),
        ("rules:\n  - match: {class: LlamaRMSNorm}\n", "is YAML text"),
        ("rules: []  # " + "y" * 300, "is YAML text"),  # too long for a file name
    ],
)
def test_rule_specs_that_are_no_file_name_say_what_to_pass(rules: str, fragment: str) -> None:
    with pytest.raises(RuleError) as caught:
        optimize(tiny_model("llama"), rules)
    one_sentence(caught.value, fragment)


@pytest.mark.parametrize("value", [torch.device("cpu"), Path("cpu")])
def test_device_and_path_overrides_are_their_text(value: Any) -> None:
    _, report = optimize(tiny_model("llama"), "llama-2gpu", gpu1=value, second="1")
    assert report.replacements[-1].device == "cpu"


def test_an_override_that_is_no_plain_value_is_one_sentence() -> None:
    with pytest.raises(RuleError) as caught:
        optimize(tiny_model("llama"), "llama-2gpu", gpu1=object())
    one_sentence(caught.value, "--set gpu1", "cannot be a rule value", "str, number")


@pytest.mark.parametrize(
    ("rule", "named"),
    [
        ({"match": {"name": re.compile("norm")}, "replace": {"class": "default"}}, "match.name"),
        ({"match": {"name": "norm$"}, "replace": {"class": torch.nn.Identity}}, "replace.class"),
        (
            {"match": {"name": "norm$"}, "replace": {"class": "default", "kwargs": {"w": PROMPT}}},
            None,
        ),
    ],
)
def test_rules_written_in_python_take_plain_values_only(rule: dict, named: str | None) -> None:
    """A compiled regex or a class object in a rule is one sentence naming its key; plain
    values (here a list in kwargs) and a torch.device as the device pass."""
    rule = {**rule, "replace": {**rule["replace"], "device": torch.device("cpu")}}
    if named is None:
        optimize(tiny_model("llama"), {"rules": [rule]})
        return
    with pytest.raises(RuleError) as caught:
        optimize(tiny_model("llama"), {"rules": [rule]})
    one_sentence(caught.value, named, "cannot be a rule value")
