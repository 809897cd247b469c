"""The in-place gathered experts of operators/triton/experts.py against their torch reference
(each token's experts gathered by torch, HF's rounding points).

fp32 agrees to ~1e-5 of the output scale (only the accumulation order differs); bf16/fp16 within
a rounding or two (interpreted bf16 casts truncate). Without CUDA the kernels run under the
Triton interpreter (conftest.py), so shapes stay small.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.triton.experts import gathered_experts, gathered_experts_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
SCALED_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def operands(tokens, top_k, experts, hidden, inter, dtype, weights_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)

    x = randn(tokens, hidden)
    gate_up = randn(experts, 2 * inter, hidden, scale=hidden**-0.5)
    down = randn(experts, hidden, inter, scale=inter**-0.5)
    # each token's k distinct experts, as a router picks them
    index = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1).to(weights_dtype)
    return x, index.to(DEVICE), weights.to(DEVICE), gate_up, down


def assert_near(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = ref.float().abs().max().item() or 1.0
    worst = (out.float() - ref.float()).abs().max().item()
    assert worst <= SCALED_TOL[dtype] * scale, f"max error {worst} at scale {scale}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(dtype, weights_dtype):
    """Sizes that are not multiples of the tiles; a token's experts anywhere in [0, E)."""
    ops = operands(3, 2, 5, 40, 24, dtype, weights_dtype)
    assert_near(gathered_experts(*ops), gathered_experts_reference(*ops), dtype)


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    tokens=st.integers(1, 9),
    top_k=st.integers(1, 4),
    hidden=st.integers(1, 48),
    inter=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_any_shape_matches_reference(tokens, top_k, hidden, inter, seed):
    ops = operands(tokens, top_k, 6, hidden, inter, torch.float32, seed=seed)
    assert_near(gathered_experts(*ops), gathered_experts_reference(*ops), torch.float32)


@needs_triton
def test_reads_each_experts_weights_in_place():
    """The result depends only on the selected experts: the others' weights may be anything."""
    x, index, weights, gate_up, down = operands(2, 2, 6, 32, 16, torch.float32)
    unused = sorted(set(range(6)) - set(index.flatten().tolist()))
    poisoned_gate_up, poisoned_down = gate_up.clone(), down.clone()
    poisoned_gate_up[unused] = float("nan")
    poisoned_down[unused] = float("nan")
    out = gathered_experts(x, index, weights, poisoned_gate_up, poisoned_down)
    assert_near(out, gathered_experts_reference(x, index, weights, gate_up, down), torch.float32)


@needs_triton
def test_no_tokens_gives_an_empty_result():
    x, index, weights, gate_up, down = operands(1, 2, 4, 16, 8, torch.float32)
    out = gathered_experts(x[:0], index[:0], weights[:0], gate_up, down)
    assert out.shape == (0, 16)


@needs_triton
@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda ops: (ops[0][:, :-1], *ops[1:]), ValueError, "hidden"),
        (lambda ops: (*ops[:3], ops[3][:, :-1], ops[4]), ValueError, "gate_up_proj must be"),
        (lambda ops: (ops[0], ops[1][:, :1], *ops[2:]), ValueError, "index and weights"),
        (lambda ops: (ops[0], ops[1].float(), *ops[2:]), TypeError, "integers"),
        (lambda ops: (*ops[:3], ops[3].half(), ops[4]), TypeError, "one float dtype"),
        (lambda ops: (ops[0].T.contiguous().T, *ops[1:]), ValueError, "contiguous"),
    ],
    ids=["hidden-size", "gate-up-shape", "index-shape", "float-index", "mixed-dtype", "stride"],
)
def test_bad_operands_are_named(change, error, message):
    ops = operands(2, 2, 4, 16, 8, torch.float32)
    with pytest.raises(error, match=message):
        gathered_experts(*change(ops))
