"""The layer's small steps as C++ operators (operators/native/layer_ops.cpp), which eager float32
decode on a CPU takes: each bit-identical to its torch reference (operators/triton/fused.py, itself
Hugging Face's operations), bad input refused in one sentence, and the engine's decode through
them bit-identical to its torch path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktinject.engine import Engine
from ktinject.inject import optimize
from operators import native
from operators.layer import FusedResidualDecoderLayer, prepare_native_decode
from operators.linear import DENSE_ROWS
from operators.native import ops
from operators.triton.fused import (
    add_rms_norm_reference,
    rms_norm_reference,
    rope_reference,
    silu_mul_reference,
)
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.skipif(
    native.library() is None or ops.kernels != "C++",
    reason="the C++ operators cannot be built here (no C/C++ compiler or torch headers)",
)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), width=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_norms_equal_the_references(rows: int, width: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, residual = torch.randn(2, rows, width, generator=generator) * 3
    weight = torch.randn(width, generator=generator)
    assert torch.equal(ops.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    normed, total = ops.add_rms_norm(x, residual, weight, 1e-5)
    want_normed, want_total = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(total, want_total)
    assert torch.equal(normed, want_normed)


@pytest.mark.parametrize("width", [576, 1536, 2048, 4096, 5120])
def test_norms_equal_the_references_at_real_model_widths(width: int) -> None:
    """torch's sum takes other paths for long rows (more vectors, more partial sums): the norm's
    division of torch's sum by N must still give torch's mean."""
    generator = torch.Generator().manual_seed(width)
    x, residual = torch.randn(2, 3, width, generator=generator) * 3
    weight = torch.randn(width, generator=generator)
    assert torch.equal(ops.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    normed, total = ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(normed, add_rms_norm_reference(x, residual, weight, 1e-5)[0])


@settings(max_examples=15, deadline=None)
@given(shape=st.sampled_from([(1, 2), (3, 64), (2, 5, 3072)]), seed=st.integers(0, 2**16))
def test_silu_mul_equals_the_reference(shape: tuple[int, ...], seed: int) -> None:
    gate_up = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4
    assert torch.equal(ops.silu_mul(gate_up), silu_mul_reference(gate_up))


def decode_problem(batch: int, heads: int, kv_heads: int, dim: int, seed: int):
    """qkv of one token per row, cos/sin, caches with room for 3 slots x 9 positions, and each
    row's distinct (slot, position)."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=generator)
    angles = torch.rand(batch, dim // 2, generator=generator) * 100
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    k_cache, v_cache = torch.randn(2, 3, kv_heads, 9, dim, generator=generator)
    cells = torch.randperm(27, generator=generator)[:batch]
    return qkv, cos, sin, k_cache, v_cache, cells // 9, cells % 9


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    dim=st.sampled_from([2, 16, 64]),
    head_norms=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope_write_kv_rotates_and_writes_as_hugging_face(
    batch: int, kv_heads: int, group: int, dim: int, head_norms: bool, seed: int
) -> None:
    heads = kv_heads * group
    qkv, cos, sin, k_cache, v_cache, slots, positions = decode_problem(
        batch, heads, kv_heads, dim, seed
    )
    q, k, v = qkv.view(batch, 1, -1, dim).split([heads, kv_heads, kv_heads], dim=2)
    norms: tuple = (None, None, 0.0)
    if head_norms:  # Qwen3's q_norm / k_norm over each head
        norms = (torch.rand(dim) + 0.5, torch.rand(dim) + 0.5, 1e-6)
        q, k = rms_norm_reference(q, norms[0], 1e-6), rms_norm_reference(k, norms[1], 1e-6)
    want_q, want_k = rope_reference(
        q.transpose(1, 2), k.transpose(1, 2), cos[:, None], sin[:, None]
    )
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    for row, (slot, position) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
        want_k_cache[slot, :, position] = want_k[row, :, 0]
        want_v_cache[slot, :, position] = v[row, 0]

    got_q = ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, positions, heads, *norms)

    assert torch.equal(got_q, want_q[:, :, 0])  # no fused multiply-add: HF's roundings
    assert torch.equal(k_cache, want_k_cache)
    assert torch.equal(v_cache, want_v_cache)  # every other cell untouched


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"positions": torch.tensor([9])}, r"positions in \[0, 9\), got slot \d and position 9"),
        ({"slots": torch.tensor([-1])}, r"slots in \[0, 3\)"),
        ({"num_heads": 3}, r"qkv \[B, 320\] for 3 query and 1 key/value heads of 64"),
        ({"cos": torch.ones(1, 32)}, r"cos and sin \[1, 64\]"),
    ],
)
def test_rope_write_kv_refuses_bad_input_in_one_sentence(change: dict, named: str) -> None:
    qkv, cos, sin, k_cache, v_cache, slots, positions = decode_problem(1, 2, 1, 64, 0)
    args = {
        "qkv": qkv,
        "cos": cos,
        "sin": sin,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "slots": slots,
        "positions": positions,
        "num_heads": 2,
    }
    args.update(change)
    with pytest.raises(ValueError, match=named):
        ops.rope_write_kv(**args, q_norm=None, k_norm=None, eps=0.0)


def test_norms_refuse_other_dtypes_in_one_sentence() -> None:
    with pytest.raises(ValueError, match="float32 x and weight"):
        ops.rms_norm(torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match=r"weight \[N\] for x \[..., N\]"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(5), 1e-6)


def test_graphs_being_compiled_keep_the_torch_references() -> None:
    x = torch.ones(3)
    choose = torch.compile(lambda t: t + 1 if ops.layer_ops_serve(t) else t - 1, backend="eager")
    assert ops.layer_ops_serve(x)
    assert torch.equal(choose(x), x - 1)
    assert not ops.layer_ops_serve(x.to(torch.bfloat16))
    assert not ops.layer_ops_serve(torch.ones(3, requires_grad=True))


def greedy_decode(
    engine: Engine, prompts: list[list[int]], steps: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill each prompt in its own slot, then decode them together greedily: the tokens and
    each step's logits."""
    last = [engine.prefill(slot, ids, reuse=False)[0] for slot, ids in enumerate(prompts)]
    tokens = [[int(row.argmax())] for row in last]
    logits = []
    for _ in range(steps):
        out = engine.decode(list(range(len(prompts))), [t[-1] for t in tokens])
        logits.append(out)
        for row, t in zip(out, tokens, strict=True):
            t.append(int(row.argmax()))
    return tokens, logits


@pytest.mark.parametrize(
    ("arch", "rules"),
    [
        ("llama", "llama"),  # float32 weights (DecodeLinear)
        ("llama", "llama-cpu-q4"),  # GGUF blocks (BlockQuantLinear)
        ("qwen2", "qwen2"),  # q/k/v bias
        ("qwen3", "qwen3"),  # per-head q/k norms
    ],
)
def test_eager_cpu_decode_of_a_layer_in_one_call_equals_its_steps_and_the_torch_path(
    arch: str, rules: str, monkeypatch
) -> None:
    """A layer decodes in one C++ call (`decode_layer`), and that gives bit for bit what its
    steps give one by one through Python, and what the torch references give."""
    model, _ = optimize(tiny_model(arch), rules, strict=True)
    engine = Engine(model, cache_lens=64, num_slots=2)
    layers = model.config.num_hidden_layers
    assert sum(m.native_decode is not None for m in model.modules() if hasattr(m, "native_decode"))
    calls = []
    for name in ("decode_layer", "rope_write_kv"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, op=op, name=name: calls.append(name) or op(*a))
    prompts = [[5, 9, 2, 7, 1], [3, 3, 8]]

    one_call = greedy_decode(engine, prompts, 6)
    assert calls == ["decode_layer"] * 6 * layers
    monkeypatch.setattr(FusedResidualDecoderLayer, "_native_decode", lambda *_: None)
    steps = greedy_decode(engine, prompts, 6)
    assert calls.count("rope_write_kv") == 6 * layers
    monkeypatch.setattr(ops, "layer_ops_serve", lambda *tensors: False)
    torch_path = greedy_decode(engine, prompts, 6)
    for other in (steps, torch_path):
        assert one_call[0] == other[0]
        for got, want in zip(one_call[1], other[1], strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("arch", "rules", "one_call"),
    [
        ("llama", "llama", True),
        ("mixtral", "mixtral", False),
        ("deepseek_v3", "deepseek-v3", False),
    ],
)
def test_only_layers_whose_every_part_has_a_cpu_kernel_decode_in_one_call(
    arch: str, rules: str, one_call: bool
) -> None:
    """MoE experts and MLA attention keep their own paths; float32 projections take the dense
    kernel up to DENSE_ROWS rows (what DecodeLinear hands it), so the one call does too."""
    model, _ = optimize(tiny_model(arch), rules, strict=True)
    Engine(model, cache_lens=32)
    layers = [m for m in model.modules() if isinstance(m, FusedResidualDecoderLayer)]
    assert layers
    assert all((layer.native_decode is not None) == one_call for layer in layers)
    if one_call:
        assert {layer.native_decode.max_rows for layer in layers} == {DENSE_ROWS}
    assert prepare_native_decode(tiny_model("llama")) == 0  # not patched: nothing to prepare


def test_decode_layer_refuses_a_malformed_projection_in_one_sentence() -> None:
    qkv, cos, sin, k_cache, v_cache, slots, positions = decode_problem(1, 2, 1, 16, 0)
    hidden, norm = torch.randn(1, 32), torch.ones(32)
    step = (torch.randn(1, 32), k_cache, v_cache, cos, sin, slots, positions, positions + 1)
    weights = (norm, 1e-5, [torch.randn(64, 32)], 2, None, None, 0.0, 0.25)
    with pytest.raises(ValueError, match=r"each projection as \[weight or packed blocks"):
        ops.decode_layer(*step, *weights, [hidden], norm, 1e-5, [hidden], [hidden])
