"""Checks shared by the tests of user-facing errors."""

from __future__ import annotations

from ktinject.errors import KtinjectError


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
