// The CPU kernels of the C library as torch operators implemented in C++, so that a call goes
// from torch's dispatcher straight to the kernel.
//
// Why: the same operators implemented in Python (operators/native/ops.py, which stays as the
// fallback) cost ~20 us a call around the kernel on a 2-core AVX2 EPYC (ctypes' argument
// conversion, the Python kernel's own work, the dispatcher calling back into Python), these
// ~3 us; a decode step of SmolLM2-135M makes ~150 such calls. The schemas and the Meta kernels
// are defined in ops.py; this file only adds the CPU kernels, with the checks and messages of
// the Python functions in operators/native/__init__.py. torch_ops.h declares them for the C++
// that composes them (layer_ops.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "torch_ops.h"

extern "C" {
int block_matmul(const float* x, int64_t M, int64_t K, const void* packed, const void* scales,
                 const void* mins, int64_t N, int bits, float* out, int threads);
int dense_matmul(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* out,
                 int threads);
int decode_attention(const float* q, int64_t B, int64_t Hq, int64_t D, const float* k_cache,
                     const float* v_cache, int64_t S, int64_t Hkv, int64_t L,
                     const int64_t* slots, const int64_t* lens, float scale, float* out,
                     int threads);
}

namespace {

// x as a contiguous float32 matrix [M, K] on the CPU (a view when it already is one).
at::Tensor rows_of(const at::Tensor& x, const char* op) {
    TORCH_CHECK_VALUE(x.dim() == 2, op, " needs x as [rows, features], got ", x.sizes());
    return x.to(at::kFloat).contiguous();
}

bool fits_cpu_float(const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat;
}

}  // namespace

namespace ktinject {

at::Tensor block_matmul_cpu(const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& scales, const std::optional<at::Tensor>& mins) {
    TORCH_CHECK_VALUE(packed.is_contiguous() && scales.is_contiguous(),
                      "block_matmul needs contiguous packed blocks and scales");
    TORCH_CHECK_VALUE(!mins || mins->is_contiguous(), "block_matmul needs contiguous mins");
    const auto type = packed.scalar_type();
    TORCH_CHECK_VALUE(type == at::kByte || type == at::kChar,
                      "block_matmul needs uint8 (Q4_1) or int8 (Q8_0) blocks, got ", type);
    const at::Tensor rows = rows_of(x, "block_matmul");
    const int64_t out_features = packed.size(0), in_features = rows.size(1);
    TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(1) * 32 == in_features,
                      "block_matmul: x has ", in_features, " features, the blocks ",
                      packed.sizes(), " (32 features a block)");
    at::Tensor out = at::empty({rows.size(0), out_features}, rows.options());
    const int status = block_matmul(
        rows.const_data_ptr<float>(), rows.size(0), in_features, packed.const_data_ptr(),
        scales.const_data_ptr(), mins ? mins->const_data_ptr() : nullptr, out_features,
        type == at::kByte ? 4 : 8, out.mutable_data_ptr<float>(), at::get_num_threads());
    TORCH_CHECK(status != -2, "block_matmul could not allocate ", in_features * 128,
                " bytes a thread");
    TORCH_CHECK_VALUE(status == 0, "block_matmul needs whole blocks of 32 features, got ",
                      in_features);
    return out;
}

at::Tensor dense_matmul_cpu(const at::Tensor& x, const at::Tensor& weight) {
    TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat && weight.dim() == 2,
                      "dense_matmul needs a float32 weight [out, in], got ", weight.scalar_type(),
                      " ", weight.sizes());
    const at::Tensor rows = rows_of(x, "dense_matmul");
    const at::Tensor w = weight.contiguous();
    TORCH_CHECK_VALUE(w.size(1) == rows.size(1), "dense_matmul: x has ", rows.size(1),
                      " features, the weight ", w.size(1));
    at::Tensor out = at::empty({rows.size(0), w.size(0)}, rows.options());
    const int status =
        dense_matmul(rows.const_data_ptr<float>(), rows.size(0), rows.size(1),
                     w.const_data_ptr<float>(), w.size(0), out.mutable_data_ptr<float>(),
                     at::get_num_threads());
    TORCH_CHECK_VALUE(status == 0, "dense_matmul needs whole blocks of 32 features, got ",
                      rows.size(1));
    return out;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& slots,
                                const at::Tensor& seq_lens, double scale) {
    // operators.native.fits_decode_attention, plus the shapes the kernel relies on
    const bool fits = fits_cpu_float(q) && fits_cpu_float(k_cache) &&
                      fits_cpu_float(v_cache) && k_cache.is_contiguous() &&
                      v_cache.is_contiguous() && q.dim() == 3 && k_cache.dim() == 4 &&
                      k_cache.sizes() == v_cache.sizes() && q.size(2) % 16 == 0 &&
                      q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(1) == 0 &&
                      slots.numel() == q.size(0) && seq_lens.numel() == q.size(0);
    TORCH_CHECK_VALUE(fits, "decode_attention cannot take q ", q.sizes(), " (",
                      q.scalar_type(), ") over caches ", k_cache.sizes(), " and ",
                      v_cache.sizes(), ": see fits_decode_attention");
    const at::Tensor query = q.contiguous();
    const at::Tensor rows = slots.to(at::kLong).contiguous();
    const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
    at::Tensor out = at::empty_like(query);
    const int status = decode_attention(
        query.const_data_ptr<float>(), query.size(0), query.size(1), query.size(2),
        k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>(), k_cache.size(0),
        k_cache.size(1), k_cache.size(2), rows.const_data_ptr<int64_t>(),
        lens.const_data_ptr<int64_t>(), static_cast<float>(scale),
        out.mutable_data_ptr<float>(), at::get_num_threads());
    TORCH_CHECK(status != -3, "decode_attention could not allocate its scratch memory");
    TORCH_CHECK_VALUE(status == 0, "decode_attention needs slots in [0, ", k_cache.size(0),
                      ") and lengths in [1, ", k_cache.size(2), "], got slots ", rows,
                      " and lengths ", lens);
    return out;
}

}  // namespace ktinject

TORCH_LIBRARY_IMPL(ktinject, CPU, m) {
    m.impl("block_matmul", &ktinject::block_matmul_cpu);
    m.impl("dense_matmul", &ktinject::dense_matmul_cpu);
    m.impl("decode_attention", &ktinject::decode_attention_cpu);
}
