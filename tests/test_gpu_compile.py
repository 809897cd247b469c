"""Every Triton kernel variant the operators launch compiles for Hopper (sm_90), on any machine.

The interpreter (the rest of the CPU suite) checks the kernels' arithmetic; only the compiler
checks that they compile, and until now that needed a GPU. `compile_for_gpu.py` compiles them
down to cubins in a process of its own (Triton decides at import whether it interprets).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_kernel_variant_compiles_for_hopper() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    kernels = {line.split()[1].rstrip(":") for line in done.stdout.splitlines()[:-1]}
    assert {"_gemv_kernel", "_rope_kernel", "_decode_split_kernel", "_rms_norm_kernel"} <= kernels


def test_a_variant_beyond_the_cards_limits_is_reported() -> None:
    """What Triton would raise OutOfResources for at the first launch on the card."""
    from types import SimpleNamespace

    from compile_for_gpu import launch_problems

    def kernel(shared: int, warps: int) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(shared=shared, num_warps=warps))

    assert launch_problems(kernel(58368, 4), 143, 90) == []
    assert launch_problems(kernel(240000, 4), 64, 90) == [
        "needs 240000 bytes of shared memory, a block may have 232448"
    ]
    assert launch_problems(kernel(0, 16), 255, 89) == [
        "255 registers x 512 threads exceed the 65536 of an SM"
    ]
