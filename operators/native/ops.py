"""The C kernels as torch operators, so a compiled decode step calls them without a graph break.

The schemas and "Meta" kernels (output shapes for the compiler) are defined here; the CPU
kernels are given once the C library is built (`operators.native.library()`, which every caller
checks first): those of `torch_ops.cpp`, compiled against torch's headers, or where that cannot
be built this package's Python functions. A call of a Python kernel cost ~25 us on a 2-core
AVX2 EPYC (2026-11-29; ~12 us more through `torch.library.custom_op`), of a C++ one ~8 us,
and a SmolLM2 decode step makes ~150 of them. The kernels run under inference mode only, so
there is no autograd formula.
"""

from __future__ import annotations

import torch

from operators import native

_LIBRARY = torch.library.Library("ktinject", "FRAGMENT")  # kept alive with this module
_LIBRARY.define("block_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? mins) -> Tensor")
_LIBRARY.define("dense_matmul(Tensor x, Tensor weight) -> Tensor")
_LIBRARY.define(
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor seq_lens, "
    "float scale) -> Tensor"
)
_LIBRARY.impl(
    "block_matmul", lambda x, packed, scales, mins: x.new_empty(x.shape[0], packed.shape[0]), "Meta"
)
_LIBRARY.impl("dense_matmul", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]), "Meta")
_LIBRARY.impl("decode_attention", lambda q, *_: torch.empty_like(q), "Meta")

# The small steps of a decoder layer between the kernels (layer_ops.cpp): C++ only, and only
# called eagerly (`layer_ops_serve`), so they need neither a Python kernel nor a Meta one.
_LIBRARY.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_LIBRARY.define(
    "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)"
)
_LIBRARY.define("silu_mul(Tensor gate_up) -> Tensor")
_LIBRARY.define(
    "rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slots, Tensor positions, int num_heads, Tensor? q_norm, Tensor? k_norm, float eps) "
    "-> Tensor"
)
# A whole decoder layer for one decode token per row, as those steps and the kernels
# (`operators.layer`): each projection is [weight or packed blocks, scales, mins, bias].
_LIBRARY.define(
    "decode_layer(Tensor x, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, Tensor sin, "
    "Tensor slots, Tensor positions, Tensor seq_lens, Tensor input_norm, float input_eps, "
    "Tensor?[] qkv, int num_heads, Tensor? q_norm, Tensor? k_norm, float head_eps, float scale, "
    "Tensor?[] o_proj, Tensor post_norm, float post_eps, Tensor?[] gate_up, Tensor?[] down) "
    "-> Tensor"
)

block_matmul = torch.ops.ktinject.block_matmul.default
dense_matmul = torch.ops.ktinject.dense_matmul.default
decode_attention = torch.ops.ktinject.decode_attention.default
rms_norm = torch.ops.ktinject.rms_norm.default
add_rms_norm = torch.ops.ktinject.add_rms_norm.default
silu_mul = torch.ops.ktinject.silu_mul.default
rope_write_kv = torch.ops.ktinject.rope_write_kv.default
decode_layer = torch.ops.ktinject.decode_layer.default

kernels: str | None = None  # which CPU kernels the operators have: "C++", "Python", or none yet


def register_python_kernels() -> None:
    """The operators' CPU kernels as this package's Python functions (no C++ build)."""
    global kernels
    for name in ("block_matmul", "dense_matmul", "decode_attention"):
        _LIBRARY.impl(name, getattr(native, name), "CPU")
    kernels = "Python"


def layer_ops_serve(*tensors: torch.Tensor) -> bool:
    """Whether the layer's small steps on `tensors` go through the C++ operators of
    `layer_ops.cpp`: float32 CPU tensors without autograd, called eagerly, once the C++
    operators are built. A graph being compiled keeps the torch references (inductor fuses them
    itself, and an operator that writes the cache would be copied around)."""
    return (
        kernels == "C++"
        and not torch.compiler.is_compiling()
        and all(
            native.cpu_float32(t) and not (t.requires_grad and torch.is_grad_enabled())
            for t in tensors
        )
    )
