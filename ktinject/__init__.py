"""ktinject: make Hugging Face causal LMs fast by declarative injection of optimized operators.

Offline by default: importing ktinject sets the Hugging Face hub to offline mode, so nothing is
ever downloaded at run time.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ktinject.errors import ContextLengthError, KtinjectError, RuleError  # noqa: E402
from ktinject.inject import InjectionReport, optimize  # noqa: E402

__all__ = ["ContextLengthError", "InjectionReport", "KtinjectError", "RuleError", "optimize"]
__version__ = "0.1.0"
