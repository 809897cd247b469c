// The C kernels' torch operators (torch_ops.cpp) as C++ functions, for the C++ code that
// composes them: layer_ops.cpp's whole decoder layer calls them without the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace ktinject {

at::Tensor block_matmul_cpu(const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& scales, const std::optional<at::Tensor>& mins);
at::Tensor dense_matmul_cpu(const at::Tensor& x, const at::Tensor& weight);
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& slots,
                                const at::Tensor& seq_lens, double scale);

}  // namespace ktinject
