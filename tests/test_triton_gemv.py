"""The fused projections of operators/triton/gemv.py against their torch references (Hugging
Face's ops in Hugging Face's order), and the engine's choice between the two decode paths.

The product's fp32 accumulation order differs from torch's, so fp32 agrees to ~1e-6 and
bf16/fp16 within a rounding or two of the output scale (interpreted bf16 casts truncate, which
makes the inputs of the product up to one ulp off on CPU). Without CUDA the kernel runs under
the Triton interpreter (conftest.py), so shapes stay small.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktinject.engine import fastest
from operators.triton import gemv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative to the largest |reference| value: the products sum K terms of either sign
SCALED_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
EPS = 1e-5


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def operands(rows: int, k: int, n: int, dtype: torch.dtype, seed: int = 0):
    x = randn(rows, 1, k, dtype=dtype, seed=seed, scale=2.0)
    residual = randn(rows, 1, k, dtype=dtype, seed=seed + 1)
    norm_weight = (1.0 + 0.2 * randn(k, seed=seed + 2)).to(dtype)
    weight = randn(n, k, dtype=dtype, seed=seed + 3, scale=k**-0.5)
    bias = randn(n, dtype=dtype, seed=seed + 4, scale=0.1)
    return x, residual, norm_weight, weight, bias


def assert_near(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    scale = ref.float().abs().max().item() or 1.0
    worst = (out.float() - ref.float()).abs().max().item()
    assert worst <= SCALED_TOL[dtype] * scale, f"max error {worst} at scale {scale}"


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add-norm"])
def test_norm_linear_matches_reference(dtype, rows, with_residual):
    x, residual, norm_weight, weight, bias = operands(rows, 96, 40, dtype)
    residual = residual if with_residual else None
    y, new_residual = gemv.norm_linear(x, residual, norm_weight, EPS, weight, bias)
    ref_y, ref_residual = gemv.norm_linear_reference(x, residual, norm_weight, EPS, weight, bias)
    assert_near(y, ref_y, dtype)
    if with_residual:  # the sum is rounded once, like torch: exact wherever casts round
        assert_near(new_residual, ref_residual, dtype)
    else:
        assert new_residual is None


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_silu_linear_matches_reference(dtype, rows):
    gate_up = randn(rows, 1, 2 * 80, dtype=dtype, scale=3.0)
    _, _, _, weight, bias = operands(rows, 80, 48, dtype)
    residual = randn(rows, 1, 48, dtype=dtype, seed=9)
    for args in ((None, None), (bias, residual)):
        out = gemv.silu_linear(gate_up, weight, *args)
        assert_near(out, gemv.silu_linear_reference(gate_up, weight, *args), dtype)


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    rows=st.integers(1, gemv.MAX_ROWS),
    k=st.integers(1, 300),
    n=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_norm_linear_random_shapes(rows, k, n, dtype, seed):
    x, residual, norm_weight, weight, _ = operands(rows, k, n, dtype, seed)
    y, new_residual = gemv.norm_linear(x, residual, norm_weight, EPS, weight)
    ref_y, ref_residual = gemv.norm_linear_reference(x, residual, norm_weight, EPS, weight)
    assert_near(y, ref_y, dtype)
    assert_near(new_residual, ref_residual, dtype)


@needs_triton
def test_rows_of_a_wider_buffer_are_read_in_place():
    wide = randn(4, 1, 200)
    x = wide[..., 8:72]  # row stride 200, last dim contiguous
    _, residual, norm_weight, weight, bias = operands(4, 64, 24, torch.float32)
    y, _ = gemv.norm_linear(x, None, norm_weight, EPS, weight, bias)
    ref, _ = gemv.norm_linear_reference(x, None, norm_weight, EPS, weight, bias)
    assert_near(y, ref, torch.float32)


@needs_triton
def test_bad_operands_are_refused_with_the_numbers():
    x, residual, norm_weight, weight, _ = operands(2, 64, 8, torch.float32)
    with pytest.raises(ValueError, match="at most 16 rows, got 17"):
        big = randn(17, 64)
        gemv.norm_linear(big, None, norm_weight, EPS, weight)
    with pytest.raises(TypeError, match="one float dtype"):
        gemv.norm_linear(x, None, norm_weight, EPS, weight.half())
    with pytest.raises(ValueError, match=r"weight must be \[N, 64\]"):
        gemv.norm_linear(x, None, norm_weight, EPS, weight[:, :32])
    with pytest.raises(ValueError, match="2I"):
        gemv.silu_linear(randn(2, 63), weight)


def test_the_switch_is_scoped():
    before = gemv.fused_gemv_preferred()
    with gemv.prefer_fused_gemv(not before):
        assert gemv.fused_gemv_preferred() == (not before) or gemv.fused_gemv_pinned() is not None
    assert gemv.fused_gemv_preferred() == before


def test_fastest_keeps_the_quicker_candidate_and_skips_timing_a_single_one():
    calls = {"slow": 0, "quick": 0}

    def slow() -> None:
        calls["slow"] += 1
        time.sleep(0.02)

    def quick() -> None:
        calls["quick"] += 1

    assert fastest({"slow": slow, "quick": quick}, rounds=2, calls=2) == "quick"
    assert calls == {"slow": 6, "quick": 6}  # per round one warm call and two timed ones
    assert fastest({"only": slow}) == "only" and calls["slow"] == 6


@pytest.mark.skipif(gemv.fused_gemv_pinned() is not None, reason="KTINJECT_FUSED_GEMV is set")
def test_the_engine_tries_both_decode_graphs_only_where_they_can_differ():
    from tiny_models import tiny_model

    from ktinject import optimize
    from ktinject.engine import Engine

    patched, _ = optimize(tiny_model("llama"), "llama", strict=True)
    engine = Engine(patched, cache_lens=32, num_slots=gemv.MAX_ROWS + 1)
    assert engine.decode_graph_options(1) == [False, True]
    assert engine.decode_graph_options(gemv.MAX_ROWS + 1) == [False]  # too many rows to fold
    engine.fused_gemv_choice[1] = True  # a grown cache re-captures what was chosen
    assert engine.decode_graph_options(1) == [True]
    unpatched = Engine(tiny_model("llama"))  # no FusedResidualDecoderLayer: nothing to fold
    assert unpatched.decode_graph_options(1) == [False]


def test_a_faster_graph_must_agree_with_the_plain_one():
    """The engine keeps the fused decode graph only if its logits match the plain graph's."""
    from ktinject.engine import same_logits

    plain = torch.randn(2, 100, generator=torch.Generator().manual_seed(0)) * 5
    assert same_logits(plain + 1e-4, plain)
    assert not same_logits(plain + 0.5, plain)  # 0.5 of a ~20 scale: over 1e-3
    assert same_logits((plain + 0.1).bfloat16(), plain.bfloat16())
    assert not same_logits(plain.bfloat16().roll(1, dims=1), plain.bfloat16())
    assert not same_logits(torch.full_like(plain, float("nan")), plain)
