"""Block-quantized linear layers (operators/linear.py) and the llama-cpu-q4 rule file.

The oracle for the operator is `F.linear` with the dequantized weight; for the rule file it is the
unpatched Hugging Face model holding the same (block-representable) weights. Weights that came
from a GGUF block format must be recovered bit for bit, checked against gguf's own quantizer.
"""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from assertions import assert_dot_products_close, one_sentence
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import given
from hypothesis import strategies as st
from test_equivalence import assert_logits_close, engine_greedy, hf_greedy
from tiny_models import tiny_model
from torch import nn

import operators.linear
from ktinject import optimize
from ktinject.engine import Engine
from ktinject.errors import RuleError
from operators import native
from operators.linear import (
    DENSE_ROWS,
    FORMATS,
    NATIVE_ROWS,
    BlockQuantLinear,
    DecodeLinear,
    _compiled,
    block_gemv,
    decode_linears,
    dequantize,
    native_projection,
    quantize_blocks,
)
from operators.native import ops as native_ops

GGUF_TYPES = {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}
PROMPT = [1, 5, 9, 13, 17, 3, 7, 11, 19, 23, 29]


def gguf_roundtrip(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """What transformers' GGUF loader hands us for a weight stored in `fmt`: gguf's dequantized
    float32 values."""
    kind = GGUF_TYPES[fmt]
    raw = gguf_quantize(weight.numpy(), kind)
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, kind)))


def block_representable(model: nn.Module, layers: str = "q4_1", head: str = "q8_0") -> None:
    """Round every projection of a Llama model through gguf, as a Q4_1 file stores them."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                fmt = head if name == "lm_head" else layers
                module.weight.copy_(gguf_roundtrip(module.weight, fmt))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_gguf_blocks_are_recovered_bit_for_bit(fmt: str) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 128) * 0.05
    weight[3, :32] = 0.25  # a constant block (zero scale)
    stored = gguf_roundtrip(weight, fmt)
    packed, scales, mins = quantize_blocks(stored, FORMATS[fmt])
    assert torch.equal(dequantize(packed, scales, mins, FORMATS[fmt]), stored)
    # the bytes are gguf's too: scale (and min), then the packed integers, block by block
    parts = [scales.view(torch.uint8).reshape(48, 4, 2)]
    if mins is not None:
        parts.append(mins.view(torch.uint8).reshape(48, 4, 2))
    parts.append(packed.view(torch.uint8))
    ours = torch.cat(parts, dim=-1).flatten(1).numpy()
    assert np.array_equal(ours, gguf_quantize(stored.numpy(), GGUF_TYPES[fmt]))


@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    rows=st.integers(1, 8),
    blocks=st.integers(1, 4),
    scale=st.floats(1e-3, 1e2),
    seed=st.integers(0, 2**16),
)
def test_quantizing_is_idempotent_and_bounded(
    fmt: str, rows: int, blocks: int, scale: float, seed: int
) -> None:
    """Any weight: the dequantized blocks quantize to themselves, and each value moves by at most
    about half a quantization step."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, 32 * blocks, generator=generator) * scale
    block_format = FORMATS[fmt]
    once = dequantize(*quantize_blocks(weight, block_format), block_format)
    twice = dequantize(*quantize_blocks(once, block_format), block_format)
    assert torch.equal(once, twice)
    block = weight.view(rows, blocks, 32)
    # Q4_1: 16 levels from min to max; Q8_0: 255 levels from -max|w| to max|w|
    q4 = fmt == "q4_1"
    step = (block.amax(-1) - block.amin(-1)) / 15 if q4 else block.abs().amax(-1) / 127
    error = (once - weight).abs().view(rows, blocks, 32).amax(-1)
    # half a step, plus the float16 rounding of scale and min
    assert torch.all(error <= step * 0.5 + 2e-3 * block.abs().amax(-1))


def quantized(linear: nn.Linear, fmt: str) -> BlockQuantLinear:
    return BlockQuantLinear.from_module(linear, name="proj", config=None, device=None, format=fmt)


def block_linear(fmt: str) -> tuple[nn.Linear, BlockQuantLinear]:
    torch.manual_seed(1)
    linear = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(gguf_roundtrip(linear.weight, fmt))
    return linear, quantized(linear, fmt)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rows", [1, 3, 9, NATIVE_ROWS + 1])
def test_operator_matches_linear(fmt: str, rows: int, with_native: bool) -> None:
    """With the C kernel every row count takes it; without it, up to GEMV_ROWS rows take the
    compiled GEMV kernel (one call per row), more rows dequantize (compiled) and multiply."""
    linear, operator = block_linear(fmt)
    x = torch.randn(rows, 1, 64)
    expected = F.linear(x, linear.weight, linear.bias)
    torch.testing.assert_close(operator(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, NATIVE_ROWS + 1])
def test_bf16_operator_takes_a_bf16_matmul_past_decode_batches(rows: int, with_native) -> None:
    """Outside fp32 the C kernel serves decode batches; more rows multiply the dequantized
    weight in the layer's dtype. Both agree with the bf16 linear within bf16 rounding."""
    linear, _ = block_linear("q4_1")
    linear = linear.to(torch.bfloat16)
    operator = quantized(linear, "q4_1")
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    out = operator(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=2e-2, atol=2e-2)


@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    rows=st.integers(1, 80),
    blocks=st.integers(1, 6),
    out_features=st.integers(1, 80),
)
def test_c_kernel_matches_the_dequantized_matmul(
    fmt: str, rows: int, blocks: int, out_features: int
) -> None:
    """Every row count (dot products in tiles of 8, 4, 2 and 1 rows up to 32 rows; unpacked
    panels of 32 or 16 columns (AVX-512, AVX2) times tiles of up to 6 rows beyond), output
    counts that leave a part of a panel, both formats."""
    if native.library() is None:
        pytest.skip("no C compiler here to build operators/native")
    weight = torch.randn(out_features, 32 * blocks)
    packed, scales, mins = quantize_blocks(weight, FORMATS[fmt])
    x = torch.randn(rows, 32 * blocks)
    weight = dequantize(packed, scales, mins, FORMATS[fmt])
    assert_dot_products_close(native.block_matmul(x, packed, scales, mins), x, weight)


@given(
    rows=st.integers(1, DENSE_ROWS + 3),
    blocks=st.integers(1, 5),
    out_features=st.integers(1, 70),
    bias=st.booleans(),
)
def test_decode_linear_matches_linear(
    rows: int, blocks: int, out_features: int, bias: bool
) -> None:
    """Float32 decode rows through the C dot kernels (tiles of 8, 4, 2, 1 rows), more rows
    through nn.Linear's own forward; only the order of the float sums differs."""
    linear = nn.Linear(32 * blocks, out_features, bias=bias)
    operator = copy.deepcopy(linear)
    operator.__class__ = DecodeLinear
    x = torch.randn(1, rows, 32 * blocks)
    with torch.inference_mode():
        assert_dot_products_close(operator(x), x, linear.weight, linear.bias)


def test_decode_linear_uses_the_c_kernel_only_where_it_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode rows of float32 without autograd; a training forward, other dtypes and more rows
    take nn.Linear's forward (with its gradients)."""
    if native.library() is None:
        pytest.skip("no C compiler here to build operators/native")
    calls: list[int] = []
    dense = native.dense_matmul
    monkeypatch.setattr(native, "dense_matmul", lambda x, w: calls.append(len(x)) or dense(x, w))
    monkeypatch.setattr(native_ops, "kernels", "Python")  # eager calls go to the function
    operator = nn.Linear(64, 16)
    operator.__class__ = DecodeLinear
    with torch.no_grad():
        operator(torch.randn(3, 64))
        operator(torch.randn(DENSE_ROWS + 1, 64))
        operator.to(torch.bfloat16)(torch.randn(1, 64, dtype=torch.bfloat16))
    operator.float()
    assert calls == [3]
    out = operator(torch.randn(2, 64))
    assert out.requires_grad and calls == [3]


def test_decode_linears_turns_plain_cpu_fp32_linears_keeping_ties() -> None:
    """Engines do this to their model: the same modules and parameters, tied weights still
    tied; widths that do not fill blocks of 32 are left alone."""
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.model.layers[0].mlp.odd = nn.Linear(33, 4)
    before = dict(model.named_parameters())
    changed = decode_linears(model)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert changed > 0 and kinds == {DecodeLinear, nn.Linear}
    assert type(model.model.layers[0].mlp.odd) is nn.Linear
    assert dict(model.named_parameters()) == before
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_without_a_c_compiler_the_torch_path_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    """No compiler: one warning, then the torch path's (same) results."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("KTINJECT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "library", functools.cache(native.library.__wrapped__))
    with caplog.at_level(logging.WARNING, logger="operators.native"):
        assert native.library() is None and native.library() is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "slower torch path" in warnings[0]
    linear, operator = block_linear("q4_1")
    monkeypatch.setattr(operators.linear, "native_available", lambda: native.library() is not None)
    x = torch.randn(2, 64)
    torch.testing.assert_close(operator(x), F.linear(x, linear.weight, linear.bias))


def test_weights_loading_onto_a_cpu_build_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built as the checkpoint loads (a model is planned on meta), not in the first forward,
    whose time a status line reports as prefill."""
    builds: list[int] = []
    monkeypatch.setattr(native, "library", lambda: builds.append(1))
    with torch.device("meta"):
        linear = nn.Linear(64, 16)
    operator = quantized(linear, "q4_1")
    assert not builds
    operator.load_state_dict({"weight": torch.randn(16, 64), "bias": torch.randn(16)}, assign=True)
    assert builds


def test_a_kernel_that_cannot_compile_runs_eagerly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a C++ compiler inductor fails on a CPU: one warning, then the same results from
    the eager expression."""
    monkeypatch.setattr(operators.linear, "native_available", lambda: False)

    def broken(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(operators.linear, "_compiled", functools.cache(_compiled.__wrapped__))
    linear, operator = block_linear("q4_1")
    x = torch.randn(1, 1, 64)
    with caplog.at_level(logging.WARNING, logger="operators.linear"):
        for _ in range(2):
            out = operator(x)
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "running it eagerly" in warnings[0]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rows", [1, 8])
def test_gemv_expression_matches_linear(fmt: str, rows: int) -> None:
    """The expression a compiled decode step inlines for up to GEMV_ROWS rows (run eagerly)."""
    linear, operator = block_linear(fmt)
    x = torch.randn(rows, 64)
    out = block_gemv(x, operator.packed, operator.scales, operator.mins, operator.fmt)
    torch.testing.assert_close(out, F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)


def test_checkpoint_weight_key_is_quantized_on_load() -> None:
    torch.manual_seed(2)
    weight, bias = torch.randn(16, 64), torch.randn(16)
    with torch.device("meta"):
        linear = nn.Linear(64, 16)
    operator = quantized(linear, "q4_1")
    operator.load_state_dict({"weight": weight, "bias": bias}, assign=True)
    expected = dequantize(*quantize_blocks(weight, FORMATS["q4_1"]), FORMATS["q4_1"])
    assert torch.equal(operator.dequantized_weight(), expected)
    assert torch.equal(operator.bias, bias)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"format": "q5_k"}, ("'q5_k'", "q4_1", "q8_0", "kwargs")),
        ({"format": "q4_1", "bits": 4}, ("bits", "kwargs")),
    ],
)
def test_bad_kwargs_are_one_sentence(kwargs: dict, fragments: tuple[str, ...]) -> None:
    rules = [
        {
            "match": {"name": r"^lm_head$"},
            "replace": {"class": "operators.linear.BlockQuantLinear", "kwargs": kwargs},
        }
    ]
    with pytest.raises(RuleError) as caught:
        optimize(tiny_model("llama"), {"rules": rules})
    one_sentence(caught.value, "lm_head", *fragments)


def test_input_features_must_fill_whole_blocks() -> None:
    model = nn.Sequential(nn.Linear(100, 8))
    rules = [
        {"match": {"class": "Linear"}, "replace": {"class": "operators.linear.BlockQuantLinear"}}
    ]
    with pytest.raises(RuleError) as caught:
        optimize(model, {"rules": rules})
    one_sentence(caught.value, "in_features 100", "multiple of the block size 32")


@pytest.fixture(scope="module")
def q4_pair() -> tuple[nn.Module, nn.Module]:
    """(unpatched tiny Llama with block-representable weights, copy patched with llama-cpu-q4).
    Six layers: enough modules built during the walk to catch a rule skipping some of them."""
    reference = tiny_model("llama", num_hidden_layers=6)
    block_representable(reference)
    patched, _ = optimize(copy.deepcopy(reference), "llama-cpu-q4", strict=True)
    return reference, patched


def test_rule_file_quantizes_every_projection(q4_pair: tuple[nn.Module, nn.Module]) -> None:
    _, patched = q4_pair
    names = [n for n, m in patched.named_modules() if isinstance(m, BlockQuantLinear)]
    assert len(names) == 6 * 4 + 1
    assert not [n for n, m in patched.named_modules() if isinstance(m, nn.Linear)]
    assert patched.lm_head.fmt.name == "q8_0"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_rule_file_generates_what_hf_does(
    q4_pair: tuple[nn.Module, nn.Module], compiled: bool
) -> None:
    """Greedy tokens equal; logits within fp32 tolerance (only the summation order differs)."""
    reference, patched = q4_pair
    engine = Engine(patched, compile=compiled)
    assert (engine.compiled is not None) == compiled
    assert engine_greedy(engine, PROMPT) == hf_greedy(reference, PROMPT)
    logits, _ = engine.prefill(0, PROMPT, reuse=False)
    step = engine.decode([0], [int(logits.argmax())])[0]
    with torch.no_grad():
        ids = torch.tensor([[*PROMPT, int(logits.argmax())]])
        expected = reference(ids).logits[0]
    assert_logits_close(logits, expected[-2])
    assert_logits_close(step, expected[-1])


def test_embedded_model_keeps_its_gguf_weights(smollm2) -> None:
    """The embedded SmolLM2 is a Q4_1 GGUF (Q8_0 embeddings): llama-cpu-q4 holds exactly the
    weights the fp32 load holds, and answers with the same greedy tokens."""
    from ktinject.chat import chat_prompt_ids
    from ktinject.loading import load

    q4 = load(None, rules="llama-cpu-q4", progress=False)
    fp32 = dict(smollm2.model.named_modules())  # fused q/k/v and gate/up there too
    checked = 0
    for name, module in q4.model.named_modules():
        if isinstance(module, BlockQuantLinear):
            assert torch.equal(module.dequantized_weight(), fp32[name].weight), name
            checked += 1
    assert checked == 30 * 4 + 1
    prompt = chat_prompt_ids(smollm2.tokenizer, [{"role": "user", "content": "Name a color."}])
    assert engine_greedy(Engine(q4.model), prompt, 12) == engine_greedy(
        Engine(smollm2.model), prompt, 12
    )


def test_projections_off_the_cpu_are_refused_before_any_kernel_build(monkeypatch) -> None:
    """Every engine asks its decoder layers' projections whether they can decode in one C++
    call, a GPU model's too: anything but float32 weights on a CPU says no without building the
    C kernels (~35 s the first time, and a warning where there is no compiler)."""
    monkeypatch.setattr(
        operators.linear, "native_available", lambda: pytest.fail("the kernels were built")
    )
    assert native_projection(nn.Linear(64, 32)) is None  # projections on a GPU stay nn.Linear
    assert native_projection(DecodeLinear(64, 32, dtype=torch.bfloat16)) is None
    bf16_blocks = BlockQuantLinear(64, 32, fmt=FORMATS["q4_1"], dtype=torch.bfloat16, bias=None)
    assert native_projection(bf16_blocks) is None
