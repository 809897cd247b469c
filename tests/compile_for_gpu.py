"""Compile every Triton kernel variant the operators launch for an NVIDIA GPU that is not here.

The CPU test suite runs the kernels under Triton's interpreter, which checks their arithmetic
but not that they compile: the interpreter is plain numpy, and accepts code that Triton's
compiler rejects. This script puts a stand-in driver in front of Triton's JIT that names a GPU
target (Hopper, sm_90, by default), calls the kernels' entry points with CPU tensors of real
decode shapes, and lets the JIT compile each launch down to a cubin (Triton ships ptxas)
instead of running it. Outputs are left unwritten.

    python tests/compile_for_gpu.py [--arch 90]

Prints one line per compiled kernel variant with ptxas' register and spill counts and its shared
memory; exits non-zero if any launch fails to compile, or a variant would fail at its first
launch on the card: more shared memory than a block may have, or more registers than a block of
its threads can get (Triton raises OutOfResources then, which only a GPU run would show). Must
run in a process of its own, without TRITON_INTERPRET (tests/test_gpu_compile.py starts it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver, jit  # noqa: E402


class AbsentGPU:
    """What Triton's JIT asks a driver before compiling, answered for a GPU that is not here."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_instead_of_launching(compiled: list) -> None:
    launch = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    jit.JITFunction.run = run


def allow_cpu_tensors() -> None:
    """The entry points refuse CPU tensors when Triton compiles for a GPU; here that is the
    point."""
    import operators.triton.decode_attention as attention
    import operators.triton.fused as fused
    import operators.triton.gemv as gemv

    for module in (fused, gemv, attention):
        module._check_triton_call = lambda *args: None


def launch_everything(dtype: torch.dtype) -> None:
    """Every entry point at the tests' tiny shapes and at SmolLM2-135M and Llama-3-8B decode
    shapes (1 and 8 rows); MoE experts at tiny and Qwen3-30B-A3B shapes (1, 8 and 16 rows)."""
    from operators.triton import decode_attention, experts, fused, gemv

    for count, hidden, inter, top_k in ((4, 64, 32, 2), (128, 2048, 768, 8)):
        gate_up = torch.empty(count, 2 * inter, hidden, dtype=dtype)
        down = torch.empty(count, hidden, inter, dtype=dtype)
        for rows in (1, 8, 16):
            index = torch.zeros(rows, top_k, dtype=torch.long)
            for weights_dtype in {dtype, torch.float32}:
                weights = torch.empty(rows, top_k, dtype=weights_dtype)
                x = torch.empty(rows, hidden, dtype=dtype)
                experts.gathered_experts(x, index, weights, gate_up, down)

    shapes = ((64, 128, 4, 2, 16), (576, 1536, 9, 3, 64), (4096, 14336, 32, 8, 128))
    for hidden, inter, heads, kv_heads, dim in shapes:
        qkv_rows = (heads + 2 * kv_heads) * dim
        norm_w = torch.ones(hidden, dtype=dtype)
        w_qkv = torch.empty(qkv_rows, hidden, dtype=dtype)
        w_down = torch.empty(hidden, inter, dtype=dtype)
        cache = torch.empty(2, kv_heads, 4096, dim, dtype=dtype)
        for tokens in (20, 128):  # prefill chunks: a token count that is / is not a multiple of 16
            x = torch.empty(1, tokens, hidden, dtype=dtype)
            fused.rms_norm(x, norm_w, 1e-5)
            fused.add_rms_norm(x, x, norm_w, 1e-5)
            fused.silu_mul(torch.empty(1, tokens, 2 * inter, dtype=dtype))
            qkv = torch.empty(1, tokens, qkv_rows, dtype=dtype)
            q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            q, k = (t.view(1, tokens, -1, dim).transpose(1, 2) for t in (q, k))
            fused.rope(q, k, *[torch.empty(1, tokens, dim, dtype=dtype)] * 2)
        for rows in (1, 8):
            x = torch.empty(rows, 1, hidden, dtype=dtype)
            gemv.norm_linear(x, None, norm_w, 1e-5, w_qkv)
            gemv.norm_linear(x, x, norm_w, 1e-5, torch.empty(2 * inter, hidden, dtype=dtype))
            gemv.silu_linear(torch.empty(rows, 1, 2 * inter, dtype=dtype), w_down, None, x)
            fused.rms_norm(x, norm_w, 1e-5)
            fused.add_rms_norm(x, x, norm_w, 1e-5)
            fused.silu_mul(torch.empty(rows, 1, 2 * inter, dtype=dtype))
            qkv = torch.empty(rows, 1, qkv_rows, dtype=dtype)
            q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            q, k, v = (t.view(rows, 1, -1, dim).transpose(1, 2) for t in (q, k, v))
            cos = sin = torch.empty(rows, 1, dim, dtype=dtype)
            slots = torch.zeros(rows, dtype=torch.long)
            positions = torch.zeros(rows, 1, dtype=torch.long)[:, 0]
            fused.rope(q, k, cos, sin)
            fused.rope_write_kv(q, k, v, cos, sin, cache, cache, slots, positions)
            norms = (torch.ones(dim, dtype=dtype), torch.ones(dim, dtype=dtype), 1e-6)
            fused.rope_write_kv(q, k, v, cos, sin, cache, cache, slots, positions, head_norms=norms)
            fused.write_kv(k[:, :, 0], v[:, :, 0], cache, cache, slots, positions)
            lengths = torch.ones(rows, dtype=torch.long)
            counters = torch.zeros(rows, kv_heads, dtype=torch.int32)
            for cache_len, merge in ((64, counters), (256, None), (4096, None), (4096, counters)):
                part = cache[:, :, :cache_len]
                decode_attention.decode_attention(
                    q[:, :, 0], part, part, slots, lengths, 0.1, counters=merge
                )
            # the fused decode graph's attention: the new token rotated and written in-kernel
            new_kv = (k[:, :, 0], v[:, :, 0], cos[:, 0], sin[:, 0])
            for cache_len, head_norms in ((64, None), (4096, None), (4096, norms)):
                part = cache[:, :, :cache_len]
                decode_attention.decode_attention(
                    q[:, :, 0],
                    part,
                    part,
                    slots,
                    lengths,
                    0.1,
                    counters=counters,
                    new_kv=new_kv,
                    head_norms=head_norms,
                )


def variant(kernel) -> str:
    """The pointer dtype and the block sizes a variant was compiled for."""
    source = kernel.src
    names = source.fn.arg_names
    pointers = {t for t in source.signature.values() if str(t).startswith("*")}
    blocks = {
        names[index[0]]: value
        for index, value in source.constants.items()
        if names[index[0]].startswith(("BLOCK", "HEAD_DIM", "ROPE", "NORM"))
    }
    return f"{sorted(pointers)[:1]} {blocks}"


# the most shared memory one block may use (opt-in), per compute capability (CUDA guide, table
# "Technical Specifications per Compute Capability"), and the registers of one SM
SHARED_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
REGISTERS_PER_BLOCK = 65536


def ptxas_registers(kernel, arch: int) -> tuple[int | None, str]:
    """Registers per thread (None if ptxas is missing) and ptxas' one-line summary."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        return None, "ptxas not found"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
        ptx.write(kernel.asm["ptx"])
    try:
        report = subprocess.run(
            [str(ptxas), "-v", f"--gpu-name=sm_{arch}a", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
        ).stderr
    finally:
        os.unlink(ptx.name)
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    summary = (
        f"{registers.group(1) if registers else '?'} registers, "
        f"{spills.group(1) if spills else '?'} bytes spilled"
    )
    return (int(registers.group(1)) if registers else None), summary


def launch_problems(kernel, registers: int | None, arch: int) -> list[str]:
    """Why this variant would fail to launch on a card of compute capability `arch`."""
    problems = []
    shared, limit = kernel.metadata.shared, SHARED_PER_BLOCK.get(arch)
    if limit is not None and shared > limit:
        problems.append(f"needs {shared} bytes of shared memory, a block may have {limit}")
    threads = kernel.metadata.num_warps * 32
    if registers is not None and registers * threads > REGISTERS_PER_BLOCK:
        problems.append(
            f"{registers} registers x {threads} threads exceed the {REGISTERS_PER_BLOCK} of an SM"
        )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: this compiles, it does not interpret", file=sys.stderr)
        return 2
    driver.set_active(AbsentGPU(GPUTarget("cuda", args.arch, 32)))
    compiled: list = []
    compile_instead_of_launching(compiled)
    allow_cpu_tensors()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        launch_everything(dtype)
    seen, failing = set(), 0
    for name, kernel in compiled:
        if id(kernel) in seen:
            continue
        seen.add(id(kernel))
        registers, summary = ptxas_registers(kernel, args.arch)
        shared = f"{kernel.metadata.shared} bytes shared"
        print(f"sm_{args.arch} {name}: {summary}, {shared} {variant(kernel)}")
        for problem in launch_problems(kernel, registers, args.arch):
            print(f"  WOULD NOT LAUNCH: {problem}")
            failing += 1
    print(f"compiled {len(seen)} kernel variants for sm_{args.arch}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
