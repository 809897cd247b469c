"""Checks shared by the tests: user-facing errors, and outputs against the HF oracle."""

from __future__ import annotations

import torch

from ktinject.errors import KtinjectError


def assert_matches_oracle(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The project's tolerances against the unpatched module: fp32 elementwise 1e-5; 16-bit 2e-2
    of the output's scale (bf16 keeps 8 bits: reordered sums, or one path rounding where the
    other does not, move single small elements by several ulps)."""
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.float().abs().max().item()
    worst = (actual.float() - expected.float()).abs().max().item()
    assert worst <= 2e-2 * scale, (
        f"max difference {worst:.3g} exceeds 2e-2 of the scale {scale:.3g}"
    )


def assert_dot_products_close(
    actual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """`actual` is x @ weight.T (+ bias) in float32, summed in some order: every element within
    the rounding bound of a K-term float32 sum in any order, K * eps * sum_k |x_k w_k|, of the
    exact (float64) value. A fixed atol/rtol fails by chance on random data, where some results
    cancel to near zero and the reordered sum keeps a few ulps of the terms."""
    x, weight = x.double(), weight.double()
    expected = x @ weight.T + (0 if bias is None else bias.double())
    bound = x.shape[-1] * torch.finfo(torch.float32).eps * (x.abs() @ weight.abs().T)
    error = (actual.double() - expected).abs()
    worst = (error - bound).max().item()
    assert actual.dtype == torch.float32 and worst <= 0, (
        f"an element is {worst:.3g} past the rounding bound of its sum"
    )


def one_sentence(error: BaseException, *fragments: str) -> str:
    """The error's message, checked to be a single-line KtinjectError containing every fragment
    (the value, the limit, the key or flag to change)."""
    message = str(error)
    assert isinstance(error, KtinjectError), f"{type(error).__name__} is not a KtinjectError"
    assert "\n" not in message, f"multi-line message: {message!r}"
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message
