"""Shared test set-up.

Triton decides between compiling and interpreting when a kernel is decorated (when its module is
imported), so on a machine without CUDA we switch the interpreter on here, before any test module
imports a kernel. `import torch` does not import triton, so asking torch about CUDA first is safe.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny_models.py

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# No per-example deadlines: a loaded 2-core CI machine must not turn timing into test failures.
settings.register_profile("ktinject", deadline=None)
settings.load_profile("ktinject")

GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip (visibly) on machines without CUDA."""
    for item in items:
        if item.get_closest_marker("gpu") is not None and not GPU:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct with its shipped rules (llama.yaml), loaded once.

    The first load in a fresh environment converts the GGUF (~20-40 s); later ones read the cache.
    """
    from ktinject.loading import load

    return load(None, progress=False)


@pytest.fixture(params=[True, False], ids=["C kernel", "torch"])
def with_native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both CPU paths of the operators that have C kernels (block-quantized linears and experts,
    decode attention): the kernels of `operators.native`, and the torch path taken where no C
    compiler builds them."""
    import operators.attention
    import operators.experts
    import operators.linear
    from operators import native

    if request.param and native.library() is None:
        pytest.skip("no C compiler here to build operators/native")
    for module in (operators.linear, operators.experts, operators.attention):
        monkeypatch.setattr(module, "native_available", lambda: request.param)
    return request.param
