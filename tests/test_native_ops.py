"""The C kernels' torch operators (operators/native/ops.py): their C++ CPU kernels
(torch_ops.cpp) give exactly what the Python functions give, refuse bad input in one sentence,
and where no C++ build is possible the Python functions serve instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from operators import native
from operators.linear import FORMATS, quantize_blocks
from operators.native import ops

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="no C compiler here to build operators/native"
)

CPP_BUILDABLE = (
    bool(shutil.which("c++") or shutil.which("g++"))
    and (Path(torch.__file__).parent / "include" / "torch" / "library.h").exists()
)


def test_the_operators_get_cpp_kernels_where_they_can_be_built() -> None:
    assert ops.kernels == ("C++" if CPP_BUILDABLE else "Python")


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(["q4_1", "q8_0", "f32"]),
    rows=st.integers(1, 40),
    blocks=st.integers(1, 4),
    out_features=st.integers(1, 40),
)
def test_matmul_operators_equal_the_functions(
    fmt: str, rows: int, blocks: int, out_features: int
) -> None:
    """Same C kernel behind both, so the same bits."""
    weight = torch.randn(out_features, 32 * blocks)
    x = torch.randn(rows, 32 * blocks)
    if fmt == "f32":
        assert torch.equal(ops.dense_matmul(x, weight), native.dense_matmul(x, weight))
        return
    blocks_ = quantize_blocks(weight, FORMATS[fmt])
    assert torch.equal(ops.block_matmul(x, *blocks_), native.block_matmul(x, *blocks_))


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 3),
    group=st.integers(1, 3),
    length=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_attention_operator_equals_the_function(
    batch: int, group: int, length: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 2 * group, 16, generator=generator)
    k_cache, v_cache = torch.randn(2, batch + 1, 2, length, 16, generator=generator)
    slots = torch.randperm(batch + 1, generator=generator)[:batch]
    lens = torch.randint(1, length + 1, (batch,), generator=generator, dtype=torch.int32)
    args = (q, k_cache, v_cache, slots, lens, 0.25)
    assert torch.equal(ops.decode_attention(*args), native.decode_attention(*args))


def test_operators_refuse_bad_input_in_one_sentence() -> None:
    packed, scales, mins = quantize_blocks(torch.randn(8, 64), FORMATS["q4_1"])
    with pytest.raises(ValueError, match="features"):
        ops.block_matmul(torch.randn(2, 32), packed, scales, mins)
    cache = torch.zeros(2, 1, 8, 16)
    with pytest.raises(ValueError, match=r"slots in \[0, 2\)"):
        ops.decode_attention(
            torch.zeros(1, 1, 16), cache, cache, torch.tensor([2]), torch.tensor([4]), 1.0
        )
    with pytest.raises(ValueError, match="fits_decode_attention"):
        ops.decode_attention(
            torch.zeros(1, 1, 16), cache[:, :, :4], cache[:, :, :4], *torch.ones(2, 1).long(), 1.0
        )


def test_without_a_cpp_compiler_the_python_functions_serve(tmp_path: Path) -> None:
    """A fresh process whose C++ compiler does not exist: the C kernels still build, the
    operators call them from Python, and nothing warns (only speed differs)."""
    script = (
        "import logging, torch\n"
        "from operators import native\n"
        "from operators.native import ops\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "assert native.library() is not None and ops.kernels == 'Python', ops.kernels\n"
        "x, w = torch.randn(3, 64), torch.randn(5, 64)\n"
        "torch.testing.assert_close(ops.dense_matmul(x, w), x @ w.T)\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "KTINJECT_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr
