"""ktinject: make Hugging Face causal LMs fast by declarative injection of optimized operators.

Offline by default: importing ktinject sets the Hugging Face hub to offline mode, so nothing is
ever downloaded at run time.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from typing import TYPE_CHECKING, Any  # noqa: E402

from ktinject.errors import ContextLengthError, KtinjectError, RuleError  # noqa: E402

if TYPE_CHECKING:
    from ktinject.inject import InjectionReport, optimize

__all__ = ["ContextLengthError", "InjectionReport", "KtinjectError", "RuleError", "optimize"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`optimize` and `InjectionReport` import torch and transformers (seconds); they load when
    first used, so the CLI's `--help` and flag errors do not wait for them."""
    if name in ("optimize", "InjectionReport"):
        from ktinject import inject

        return getattr(inject, name)
    raise AttributeError(f"module 'ktinject' has no attribute {name!r}")
