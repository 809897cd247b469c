"""CPU kernels written in C, built on first use with the system's C compiler and called through
ctypes.

Why C: a decode batch of B rows multiplies every weight B times, and a GGUF block weight must be
unpacked before it is multiplied. Inductor's loop for `operators.linear.block_gemv` unpacks each
block once per row, so batched decode was compute-bound on unpacking: on a 2-core AVX-512 EPYC
(2026-11-29) the 30 layers of SmolLM2-135M took 11 ms for 1 row, 35 ms for 4 and 66 ms for 8.
`block_matmul.c` unpacks a block once for up to 8 rows: 5.4, 8.8 and 14.8 ms. For a prefill
(128 rows) torch had to dequantize every weight to fp32 in memory and multiply: 214 ms for the
30 layers, against 174 ms for HF's matmul of weights already in fp32; the C kernel's cached
panels take 155 ms (1,024 rows: 1,039 vs HF's 1,188 ms). Building takes ~0.3 s, far less than
compiling the torch-header extension `torch.utils.cpp_extension` would; the library is cached
per source, compiler and CPU under the ktinject cache folder.

The same dot kernels take plain float32 weights (`dense_matmul`, through
`operators.linear.DecodeLinear`): torch's GEMV streamed SmolLM2's fp32 projections at 11-17 GB/s
on that CPU, these at 26-33 GB/s (18 ms of a decode step instead of ~45; the head alone 3.5 vs
9.7 ms).

On an AVX2 CPU (2-core EPYC, Zen 3, no AVX-512; 2026-11-29) the kernels first ran 5-24x slower
than they do now, slower than torch: their 16-float vectors were not split into AVX2 registers
but moved through the stack every step. Vectors are one register wide since (see the C source);
there the SmolLM2 MLP's weight (576 x 1,536) takes 0.23 ms in float32 and 0.07 ms in Q4_1 for
one row, 0.30 and 0.17 ms for 8 rows; a Llama-3-8B MLP weight (4,096 x 14,336) 11.9 and 3.6 ms
for one row (float32 at ~20 GB/s, the memory's rate).

`decode_attention.c` is the CPU's decode attention: each row's keys and values read in place
for all the query heads that share them, where torch had to gather a masked copy of them first
(`operators.attention.native_attention_fits` has its numbers).

The kernels reach torch as operators (`ops`, so compiled graphs call them without a break)
whose CPU kernels are C++ (`torch_ops.cpp`, built with `library()` against torch's headers,
~35 s the first time on a 2-core CPU): through ctypes a call cost ~20 us more, and a decode step
makes ~150 calls. Without a C++ compiler the operators call this module's functions. The same
build gives the small steps between the kernels (norms, SiLU-and-mul, the rotary embedding and
the cache write) C++ operators for eager float32 decode, and a whole decoder layer of them and
the kernels as one (`layer_ops.cpp`; C++ only: without it the torch references serve).

Where no compiler (or no OpenMP) is available, `library()` warns once and returns None, and the
callers keep their torch path: same results, slower. `KTINJECT_NATIVE=0` chooses that path on
purpose (for A/B runs), `KTINJECT_NATIVE=ctypes` the C kernels without their C++ torch
operators (`ops`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "block_matmul.c", HERE / "decode_attention.c")
HEADERS = (HERE / "vectors.h",)
# the kernels' torch operators, and the layer's small steps between them (eager CPU decode)
TORCH_OPS = (HERE / "torch_ops.cpp", HERE / "layer_ops.cpp")
TORCH_OPS_HEADERS = (HERE / "torch_ops.h",)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BITS = {torch.uint8: 4, torch.int8: 8}  # packed dtype -> format (Q4_1, Q8_0)


def _cpu_identity() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build(name: str, command: list[str], inputs: list[bytes]) -> Path:
    """`cache_root()/native/<name>-<key>.so`, built by `command` + `-o <file>` unless a library
    of these `inputs` (sources, compiler, flags, CPU, ...) is already cached."""
    from ktinject.loading import cache_root

    key = hashlib.sha256(b"\0".join([*inputs, " ".join(command).encode()]))
    target = cache_root() / "native" / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([*command, "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: a concurrent build leaves one whole file
    return target


def _build_kernels(compiler: str) -> Path:
    """The C kernels for this compiler and CPU."""
    texts = [path.read_bytes() for path in (*SOURCES, *HEADERS)]
    command = [compiler, *FLAGS, *map(str, SOURCES), "-lm"]
    return _build("kernels", command, [*texts, _cpu_identity().encode()])


def _build_torch_ops(kernels: Path) -> Path:
    """`TORCH_OPS` (the C++ operators) for this torch, linked to `kernels`. Built without fused
    multiply-adds, so the rotary embedding rounds as torch does. Raises where there is no C++
    compiler or torch ships no headers."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (c++, g++ or $CXX) on PATH")
    root = Path(torch.__file__).parent
    if not (root / "include" / "torch" / "library.h").exists():
        raise FileNotFoundError(f"torch has no C++ headers under {root / 'include'}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        *[compiler, "-O2", "-std=c++20", "-ffp-contract=off", "-shared", "-fPIC"],
        *[f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}"],
        *[*map(str, TORCH_OPS), str(kernels)],
        *[f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{kernels.parent}"],
    ]
    inputs = [*(path.read_bytes() for path in (*TORCH_OPS, *TORCH_OPS_HEADERS))]
    inputs.append(torch.__version__.encode())
    inputs.append(str(root).encode())
    return _build("torch-ops", command, inputs)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (one warning) where they cannot be built or loaded."""
    if os.environ.get("KTINJECT_NATIVE", "").strip() == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if compiler is None:
            raise FileNotFoundError("no C compiler (cc, gcc or $CC) on PATH")
        path = _build_kernels(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        log.warning(
            "could not build the C kernels for CPU decode (%s); using the slower torch path",
            detail.strip().splitlines()[-1][:200] if detail.strip() else type(exc).__name__,
        )
        return None
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    kernels = (lib.block_matmul, lib.block_matmul_experts, lib.dense_matmul, lib.decode_attention)
    for function in kernels:
        function.restype = ctypes.c_int
    # x, M, K, w, N, out, threads
    lib.dense_matmul.argtypes = [pointer, size, size, pointer, size, pointer, flag]
    # x, M, K, packed, scales, mins, N, bits, out, threads
    lib.block_matmul.argtypes = [pointer, size, size, *[pointer] * 3, size, flag, pointer, flag]
    # x, P, K, experts, E, packed, scales, mins, N, bits, out, threads
    lib.block_matmul_experts.argtypes = [
        *[pointer, size, size, pointer, size],
        *[pointer] * 3,
        *[size, flag, pointer, flag],
    ]
    # q, B, Hq, D, k_cache, v_cache, S, Hkv, L, slots, lens, scale, out, threads
    lib.decode_attention.argtypes = [
        *[pointer, size, size, size, pointer, pointer, size, size, size, pointer, pointer],
        *[ctypes.c_float, pointer, flag],
    ]
    _give_ops_kernels(path)
    return lib


def _give_ops_kernels(kernels: Path) -> None:
    """Give the torch operators of `ops` their CPU kernels, once: the C++ ones of
    `torch_ops.cpp` linked to `kernels`, or, where those cannot be built (no C++ compiler, no
    torch headers), this module's Python functions: same results, ~20 us more a call."""
    from operators.native import ops

    if ops.kernels is not None:
        return
    try:
        if os.environ.get("KTINJECT_NATIVE", "").strip() == "ctypes":
            raise RuntimeError("KTINJECT_NATIVE=ctypes")
        torch.ops.load_library(str(_build_torch_ops(kernels)))
        ops.kernels = "C++"
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = (getattr(exc, "stderr", None) or str(exc)).strip()
        log.info(
            "C++ torch operators not built (%s); the C kernels are called from Python",
            detail.splitlines()[-1][:200] if detail else type(exc).__name__,
        )
        ops.register_python_kernels()


def build_for(device: torch.device | str | None) -> None:
    """Build the kernels now when an operator's weights are on a CPU (called as they are
    built or loaded), so the first forward of a generation does not pay for it (~0.3 s, and
    the first time on a machine ~35 s for the C++ operators)."""
    if device is not None and torch.device(device).type == "cpu":
        library()


def _built() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the C kernels are not built; check operators.native.library() first")
    return lib


def _blocks(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> tuple[int, int, int | None]:
    """Addresses of (packed, scales, mins), which must be contiguous."""
    if not (packed.is_contiguous() and scales.is_contiguous()):
        raise ValueError("block_matmul needs contiguous packed blocks and scales")
    if mins is not None and not mins.is_contiguous():
        raise ValueError("block_matmul needs contiguous mins")
    minimum = mins.data_ptr() if mins is not None else None
    return packed.data_ptr(), scales.data_ptr(), minimum


def _run(kernel: Any, x: torch.Tensor, out_features: int, *weights: Any) -> tuple[int, Any]:
    """Call `kernel` of the library on x [M, K] (as contiguous float32) into a new float32
    out [M, out_features]: every kernel takes (x, M, K, <its weight arguments>, out, threads).
    Returns (status, out). The caller holds the tensors behind `weights`' addresses."""
    x = x.float().contiguous()
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    status = kernel(x.data_ptr(), *x.shape, *weights, out.data_ptr(), torch.get_num_threads())
    return status, out


def block_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> torch.Tensor:
    """`x [M, K] @ W.T` in float32 for the block weight W [N, K] that (packed, scales, mins)
    stand for (Q4_1 when packed is uint8, Q8_0 when int8; layouts of `operators.linear`), any
    number of rows. CPU tensors; needs `library()`."""
    out_features, in_features = packed.shape[0], x.shape[1]
    blocks = _blocks(packed, scales, mins)
    status, out = _run(
        _built().block_matmul, x, out_features, *blocks, out_features, BITS[packed.dtype]
    )
    if status == -2:
        raise MemoryError(f"block_matmul could not allocate {in_features * 128} bytes a thread")
    if status:
        raise ValueError(f"block_matmul needs whole blocks of 32 features, got {in_features}")
    return out


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x [M, K] @ weight.T` for a float32 weight [N, K] (K a multiple of 32), through the dot
    kernels: meant for decode batches of a few rows. CPU tensors; needs `library()`."""
    weight = weight.contiguous()  # held here while C reads it
    out_features = weight.shape[0]
    status, out = _run(_built().dense_matmul, x, out_features, weight.data_ptr(), out_features)
    if status:
        raise ValueError(f"dense_matmul needs whole blocks of 32 features, got {x.shape[1]}")
    return out


def block_matmul_experts(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
) -> torch.Tensor:
    """Row p of `x [P, K]` times the transpose of expert `experts[p]`'s block weight, for the
    weights of E experts stacked as [E, N, K/32, w] (`operators.experts.CPUExperts`): [P, N] in
    float32, the experts' bytes read in place."""
    experts = experts.to(torch.int64).contiguous()
    count, out_features = packed.shape[:2]
    status, out = _run(
        _built().block_matmul_experts,
        x,
        out_features,
        experts.data_ptr(),
        count,
        *_blocks(packed, scales, mins),
        out_features,
        BITS[packed.dtype],
    )
    if status:
        raise ValueError(
            f"block_matmul_experts needs whole blocks of 32 features (got {x.shape[1]}) and "
            f"expert ids in [0, {count}) (got {experts.tolist()})"
        )
    return out


def cpu_float32(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is float32 on a CPU: what every kernel here and its C++ operators read."""
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu"


def fits_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` takes these tensors: float32 on a CPU, caches contiguous, a
    head size that is whole vectors on every CPU (a multiple of 16) and whole query groups."""
    return cpu_float32(q) and caches_fit_decode_attention(k_cache, v_cache, q.shape[1], q.shape[-1])


def caches_fit_decode_attention(
    k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, head_dim: int
) -> bool:
    """`fits_decode_attention` for float32 CPU queries of `num_heads` heads of `head_dim`, before
    there are any (a whole decoder layer in one call checks it first)."""
    return (
        cpu_float32(k_cache)
        and cpu_float32(v_cache)
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and head_dim % 16 == 0
        and num_heads % k_cache.shape[1] == 0
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per row `q [B, Hq, D]` over the first `seq_lens[b]` positions of
    cache slot `slots[b]` (caches `[S, Hkv, L, D]`), read in place: the contract of
    `operators.triton.decode_attention.decode_attention_reference`, for contiguous float32 CPU
    tensors with D a multiple of the vector width (`fits_decode_attention`). Needs `library()`."""
    if not fits_decode_attention(q, k_cache, v_cache) or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"decode_attention cannot take q {tuple(q.shape)} ({q.dtype}) over caches "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}: see fits_decode_attention"
        )
    q = q.contiguous()
    rows = slots.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    status = _built().decode_attention(
        q.data_ptr(),
        *q.shape,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        *k_cache.shape[:3],
        rows.data_ptr(),
        lens.data_ptr(),
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status == -3:
        raise MemoryError("decode_attention could not allocate its scratch memory")
    if status:
        raise ValueError(
            f"decode_attention needs slots in [0, {k_cache.shape[0]}) and lengths in "
            f"[1, {k_cache.shape[2]}], got slots {rows.tolist()} and lengths {lens.tolist()}"
        )
    return out
