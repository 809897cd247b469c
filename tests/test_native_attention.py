"""The C decode-attention kernel (operators/native/decode_attention.c) against attention computed
in float64: any batch, grouping, head size and length (across its chunks of 128 positions),
garbage past each row's length never read, bad slots and lengths refused in one sentence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_triton_decode_attention import make_case, naive_oracle

from operators import native

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="no C compiler here to build operators/native"
)


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 4))
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([16, 32, 64, 128]))
    slots_count, length = draw(st.integers(batch, batch + 2)), draw(st.integers(1, 300))
    slots = draw(st.permutations(range(slots_count)))[:batch]
    lens = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**16))
    return batch, kv_heads, group, head_dim, slots_count, length, slots, lens, seed


@given(problems())
def test_kernel_matches_float64_attention(problem) -> None:
    batch, kv_heads, group, head_dim, slots_count, length, slots, lens, seed = problem
    case = make_case(  # every position no row may read holds NaN
        batch,
        kv_heads * group,
        kv_heads,
        length,
        head_dim,
        torch.tensor(lens, dtype=torch.int32),
        S=slots_count,
        slots=slots,
        seed=seed,
    )
    q, k_cache, v_cache, slots, lens = (t.cpu() for t in case)
    out = native.decode_attention(q, k_cache, v_cache, slots, lens, head_dim**-0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape
    expected = naive_oracle(q, k_cache, v_cache, slots, lens, head_dim**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("slots", "lens", "named"),
    [([2], [4], "slots in [0, 2)"), ([0], [0], "lengths in [1, 8]"), ([1], [9], "[9]")],
)
def test_bad_slots_and_lengths_are_refused_by_name(slots, lens, named: str) -> None:
    cache = torch.zeros(2, 1, 8, 16)
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace(")", r"\)")):
        native.decode_attention(
            torch.zeros(1, 1, 16), cache, cache, torch.tensor(slots), torch.tensor(lens), 1.0
        )


def test_what_the_kernel_does_not_take_stays_with_torch() -> None:
    """bf16, a cache that is a view with gaps, a head size that is not whole vectors on every
    CPU, query heads that are not whole groups: `fits_decode_attention` says no."""
    q, cache = torch.zeros(1, 4, 16), torch.zeros(1, 2, 8, 16)
    assert native.fits_decode_attention(q, cache, cache)
    assert not native.fits_decode_attention(q.bfloat16(), cache.bfloat16(), cache.bfloat16())
    assert not native.fits_decode_attention(q, cache[:, :, :4], cache[:, :, :4])
    odd = torch.zeros(1, 2, 8, 8)
    assert not native.fits_decode_attention(torch.zeros(1, 4, 8), odd, odd)
    assert not native.fits_decode_attention(torch.zeros(1, 3, 16), cache, cache)
    rows = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    with pytest.raises(ValueError, match="fits_decode_attention"):  # not silently wrong
        native.decode_attention(q, cache[:, :, :4], cache[:, :, :4], *rows, 1.0)
