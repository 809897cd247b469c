"""The oracle test: a patched model generates exactly what the unpatched Hugging Face model does.

For every supported architecture (tiny random weights, fp32) and for the embedded SmolLM2:
- greedy tokens of the patched model through our engine equal `model.generate` of the unpatched
  model, for 32 new tokens, for prefill chunk sizes 1, 7, 64 and whole-prompt;
- the patched model also still works with Hugging Face's own `generate` (operators fall back to
  HF's cache outside an engine context);
- last-position logits agree within fp32 tolerance (atol 1e-4 relative to the logit scale).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model

from ktinject import optimize
from ktinject.engine import Engine
from ktinject.loading import rules_for
from ktinject.sampling import SamplingParams

PROMPT = [1, 5, 9, 13, 17, 3, 7, 11, 19, 23, 29]
NEW_TOKENS = 32
LOGIT_RTOL = 1e-4


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """HF's greedy continuation, without the end-of-sequence token (our engine does not report
    it as generated text). The tiny models have no EOS, so they always give `new_tokens`."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    tokens = out[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


def engine_greedy(engine: Engine, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    generation = engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens))
    generation.result()
    return generation.token_ids


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=LOGIT_RTOL * max(scale, 1.0))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def pair(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, torch.nn.Module]:
    """(arch, unpatched reference, copy patched with the family's shipped rule file)."""
    arch = request.param
    reference = tiny_model(arch)
    rules = rules_for(arch)
    assert rules is not None, f"no shipped rule file for {arch}"
    patched, report = optimize(copy.deepcopy(reference), rules, strict=True)
    assert report.replacements
    return arch, reference, patched


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 8192])
def test_engine_greedy_tokens_equal_hf(pair, chunk_size: int) -> None:
    _, reference, patched = pair
    expected = hf_greedy(reference, PROMPT)
    assert engine_greedy(Engine(patched, chunk_size=chunk_size), PROMPT) == expected


def test_patched_model_keeps_working_with_hf_generate(pair) -> None:
    _, reference, patched = pair
    assert hf_greedy(patched, PROMPT) == hf_greedy(reference, PROMPT)


def test_prefill_logits_match_hf(pair) -> None:
    _, reference, patched = pair
    with torch.inference_mode():
        expected = reference(torch.tensor([PROMPT])).logits[0, -1]
    logits, _ = Engine(patched, chunk_size=4).prefill(0, PROMPT)
    assert_logits_close(logits, expected)


def test_decode_logits_match_hf(pair, with_native) -> None:
    """Logits of every decode step, fed the same tokens, against one HF forward of the whole
    sequence (decode attention through the C kernel and through torch)."""
    _, reference, patched = pair
    tokens = PROMPT + hf_greedy(reference, PROMPT, 8)
    with torch.inference_mode():
        expected = reference(torch.tensor([tokens])).logits[0]
    engine = Engine(patched)
    engine.reserve(len(PROMPT), 8)
    engine.prefill(0, PROMPT)
    for index in range(len(PROMPT), len(tokens)):
        step = engine.decode([0], [tokens[index]])[0]
        assert_logits_close(step, expected[index])


def test_unpatched_model_runs_on_dynamic_cache(pair) -> None:
    """A model no rule touched (or with an empty rule file) runs through HF's DynamicCache."""
    _, reference, _ = pair
    plain, report = optimize(copy.deepcopy(reference), {"rules": []})
    assert not report.replacements
    engine = Engine(plain, chunk_size=5)
    assert not engine.static
    assert engine_greedy(engine, PROMPT) == hf_greedy(reference, PROMPT)


@pytest.mark.slow
def test_embedded_smollm2_matches_hf(smollm2) -> None:
    """The real model: patched by rules/llama.yaml vs the same weights with no rules."""
    from ktinject.chat import chat_prompt_ids
    from ktinject.loading import load

    reference = load(None, rules=None, progress=False).model
    question = "Explain in a few sentences why the sky is blue."
    prompt = chat_prompt_ids(smollm2.tokenizer, [{"role": "user", "content": question}])
    expected = hf_greedy(reference, prompt)
    assert len(expected) >= NEW_TOKENS
    for chunk_size in (7, 8192):
        assert engine_greedy(Engine(smollm2.model, chunk_size=chunk_size), prompt) == expected
    with torch.inference_mode():
        reference_logits = reference(torch.tensor([prompt])).logits[0, -1]
    logits, _ = Engine(smollm2.model).prefill(0, prompt)
    assert_logits_close(logits, reference_logits)
