"""The C kernels as torch operators, so a compiled decode step calls them without a graph break.

Registered with `torch.library.Library` rather than `torch.library.custom_op`: each call of a
`custom_op` went through ~12 us of Python dispatch on a 2-core AVX2 EPYC (2026-11-29), a direct
registration ~5 us, and a compiled SmolLM2 step makes ~150 of these calls. The "Meta" kernels
give output shapes to the compiler; the kernels run under inference mode only, so there is no
autograd formula.
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
_LIBRARY.impl("block_matmul", native.block_matmul, "CPU")
_LIBRARY.impl("dense_matmul", native.dense_matmul, "CPU")
_LIBRARY.impl("decode_attention", native.decode_attention, "CPU")
_LIBRARY.impl(
    "block_matmul", lambda x, packed, scales, mins: x.new_empty(x.shape[0], packed.shape[0]), "Meta"
)
_LIBRARY.impl("dense_matmul", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]), "Meta")
_LIBRARY.impl("decode_attention", lambda q, *_: torch.empty_like(q), "Meta")

block_matmul = torch.ops.ktinject.block_matmul.default
dense_matmul = torch.ops.ktinject.dense_matmul.default
decode_attention = torch.ops.ktinject.decode_attention.default
