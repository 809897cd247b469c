// The small steps of a decoder layer between its matrix products, as one C++ operator each, for
// eager float32 decode on a CPU: RMSNorm, the residual add with the norm after it, SiLU-and-mul,
// and the rotary embedding of q and k with the new token's K/V written into the static cache.
//
// Why: an eager SmolLM2 decode step on a 2-core AVX2 EPYC spent ~17 ms of its ~60 ms outside
// the projections (2026-11-30), in ~90 small torch calls a layer (Hugging Face's RMSNorm alone is
// eight, its rotate-half rotary embedding a dozen, the cache write four slices) and the Python
// around each. Here a step is one call: the norms keep torch's own sum and do the rest by hand,
// SiLU runs torch's kernels from C++ (no Python between them), the rotation and cache write are
// one loop. `decode_layer` runs a whole decoder layer of those steps and the kernels
// (torch_ops.h) in one call.
//
// Numerics: bit-identical to operators/triton/fused.py's references, hence to Hugging Face (the
// rotation rounds each product and the sum on their own: this file is built with fp-contract
// off, so no fused multiply-add).
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sum.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "torch_ops.h"

namespace {

// Hugging Face's LlamaRMSNorm of float32 x [..., N], bit for bit (operators/triton/fused.py's
// rms_norm_reference): w * (x * rsqrt(mean(x^2) + eps)). The sum of the squares is torch's own
// (its order of additions); the squares, the division by N (torch's float32 mean is its sum
// divided by N), the scale and the products are the same single roundings by hand, which
// saves the other torch calls (~5 us each on a 2-core AVX2 EPYC; `mean` alone cost twice `sum`).
at::Tensor hf_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
    const at::Tensor rows = x.contiguous(), w = weight.contiguous();
    const int64_t n = rows.size(-1), count = n ? rows.numel() / n : 0;
    const float* src = rows.const_data_ptr<float>();
    at::Tensor squares = at::empty_like(rows);
    float* square = squares.mutable_data_ptr<float>();
    for (int64_t i = 0; i < count * n; i++) square[i] = src[i] * src[i];
    const at::Tensor sums = at::sum(squares, -1).contiguous();
    const float* sum = sums.const_data_ptr<float>();
    const float* scale = w.const_data_ptr<float>();
    at::Tensor out = at::empty_like(rows);
    float* dst = out.mutable_data_ptr<float>();
    for (int64_t r = 0; r < count; r++) {
        const float mean = sum[r] / static_cast<float>(n);
        const float inverse = 1.0f / std::sqrt(mean + static_cast<float>(eps));
        for (int64_t i = 0; i < n; i++) dst[r * n + i] = scale[i] * (src[r * n + i] * inverse);
    }
    return out;
}

void check_norm(const at::Tensor& x, const at::Tensor& weight, const char* op) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
                      " needs float32 x and weight, got ", x.scalar_type(), " and ",
                      weight.scalar_type());
    TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), op,
                      " needs a weight [N] for x [..., N], got x ", x.sizes(), " and weight ",
                      weight.sizes());
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_norm(x, weight, "rms_norm");
    return hf_rms_norm(x, weight, eps);
}

// (rms_norm(residual + x), residual + x), the sum rounded before the norm reads it.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x,
                                                    const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
    check_norm(x, weight, "add_rms_norm");
    TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && residual.scalar_type() == at::kFloat,
                      "add_rms_norm needs a float32 residual shaped like x ", x.sizes(), ", got ",
                      residual.scalar_type(), " ", residual.sizes());
    at::Tensor sum = at::add(residual, x);
    return {hf_rms_norm(sum, weight, eps), sum};
}

// silu(gate) * up for gate_up [..., 2I] holding gate then up.
at::Tensor silu_mul_cpu(const at::Tensor& gate_up) {
    TORCH_CHECK_VALUE(gate_up.scalar_type() == at::kFloat && gate_up.dim() >= 1 &&
                          gate_up.size(-1) % 2 == 0,
                      "silu_mul needs float32 gate_up [..., 2I], got ", gate_up.scalar_type(),
                      " ", gate_up.sizes());
    const int64_t width = gate_up.size(-1) / 2;
    return at::mul(at::silu(gate_up.narrow(-1, 0, width)), gate_up.narrow(-1, width, width));
}

// Hugging Face's rotate-half rotary embedding of one head of D values: out = x * cos +
// rotate_half(x) * sin, each product and the sum rounded on their own.
void rotate_head(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < D; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

void check_head_norm(const std::optional<at::Tensor>& norm, int64_t D, const char* what) {
    if (!norm) return;
    TORCH_CHECK_VALUE(norm->scalar_type() == at::kFloat && norm->dim() == 1 && norm->size(0) == D,
                      "rope_write_kv needs a float32 ", what, " of ", D, " values, got ",
                      norm->scalar_type(), " ", norm->sizes());
}

// heads [B, H, D] of qkv, through a per-head RMSNorm (Qwen3's q_norm / k_norm) when given
at::Tensor heads_of(const at::Tensor& qkv, int64_t first, int64_t count, int64_t D,
                    const std::optional<at::Tensor>& norm, double eps) {
    const at::Tensor heads = qkv.narrow(1, first * D, count * D).view({qkv.size(0), count, D});
    return norm ? hf_rms_norm(heads, *norm, eps) : heads;
}

// One decode token per row b of qkv [B, (Hq + 2 Hkv) D] (q heads, then k, then v): q and k
// rotated by cos/sin [B, D] (after per-head norms when given), the rotated k and the v written at
// cache position positions[b] of slot slots[b] (caches [S, Hkv, L, D]); returns the rotated q
// [B, Hq, D].
at::Tensor rope_write_kv_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                             const at::Tensor& positions, int64_t num_heads,
                             const std::optional<at::Tensor>& q_norm,
                             const std::optional<at::Tensor>& k_norm, double eps) {
    const bool floats = qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                        sin.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                        v_cache.scalar_type() == at::kFloat;
    TORCH_CHECK_VALUE(floats && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                          k_cache.is_contiguous() && v_cache.is_contiguous(),
                      "rope_write_kv needs float32 tensors and contiguous caches [S, Hkv, L, D], "
                      "got caches ",
                      k_cache.sizes(), " and ", v_cache.sizes());
    const int64_t S = k_cache.size(0), Hkv = k_cache.size(1), L = k_cache.size(2);
    const int64_t D = k_cache.size(3), Hq = num_heads;
    const int64_t B = qkv.size(0), width = (Hq + 2 * Hkv) * D;
    TORCH_CHECK_VALUE(qkv.dim() == 2 && qkv.size(1) == width && qkv.stride(1) == 1 && D % 2 == 0,
                      "rope_write_kv needs qkv [B, ", width, "] for ", Hq, " query and ", Hkv,
                      " key/value heads of ", D, ", got ", qkv.sizes());
    for (const at::Tensor* t : {&cos, &sin})
        TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) == D &&
                              t->stride(1) == 1,
                          "rope_write_kv needs cos and sin [", B, ", ", D, "], got ",
                          t->sizes());
    TORCH_CHECK_VALUE(slots.numel() == B && positions.numel() == B,
                      "rope_write_kv needs one slot and one position a row, got ", slots.numel(),
                      " and ", positions.numel(), " for ", B, " rows");
    check_head_norm(q_norm, D, "q_norm");
    check_head_norm(k_norm, D, "k_norm");
    const at::Tensor rows = slots.to(at::kLong).contiguous();
    const at::Tensor at_positions = positions.to(at::kLong).contiguous();
    const int64_t* slot = rows.const_data_ptr<int64_t>();
    const int64_t* position = at_positions.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++)
        TORCH_CHECK_VALUE(0 <= slot[b] && slot[b] < S && 0 <= position[b] && position[b] < L,
                          "rope_write_kv needs slots in [0, ", S, ") and positions in [0, ", L,
                          "), got slot ", slot[b], " and position ", position[b]);
    const at::Tensor q = heads_of(qkv, 0, Hq, D, q_norm, eps);
    const at::Tensor k = heads_of(qkv, Hq, Hkv, D, k_norm, eps);
    at::Tensor q_out = at::empty({B, Hq, D}, qkv.options());
    float* q_dst = q_out.mutable_data_ptr<float>();
    float* keys = k_cache.mutable_data_ptr<float>();
    float* values = v_cache.mutable_data_ptr<float>();
    for (int64_t b = 0; b < B; b++) {
        const float* c = cos.const_data_ptr<float>() + b * cos.stride(0);
        const float* s = sin.const_data_ptr<float>() + b * sin.stride(0);
        for (int64_t h = 0; h < Hq; h++)
            rotate_head(q.const_data_ptr<float>() + b * q.stride(0) + h * q.stride(1), c, s, D,
                        q_dst + (b * Hq + h) * D);
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t at = ((slot[b] * Hkv + h) * L + position[b]) * D;
            rotate_head(k.const_data_ptr<float>() + b * k.stride(0) + h * k.stride(1), c, s, D,
                        keys + at);
            const float* v = qkv.const_data_ptr<float>() + b * qkv.stride(0) + (Hq + Hkv + h) * D;
            std::copy(v, v + D, values + at);
        }
    }
    return q_out;
}

using Projection = c10::List<std::optional<at::Tensor>>;

// x [B, K] times a projection given as [weight or packed blocks, scales, mins, bias]
// (operators.linear.native_projection): a float32 weight through the dense kernel, GGUF blocks
// through the block kernel, then the bias added, as DecodeLinear and BlockQuantLinear do.
at::Tensor project(const at::Tensor& x, const Projection& projection) {
    TORCH_CHECK_VALUE(projection.size() == 4 && projection.get(0).has_value(),
                      "decode_layer needs each projection as [weight or packed blocks, scales, "
                      "mins, bias], got ",
                      projection.size(), " entries");
    const at::Tensor weight = *projection.get(0);
    at::Tensor out;
    if (weight.scalar_type() == at::kFloat) {
        out = ktinject::dense_matmul_cpu(x, weight);
    } else {
        const std::optional<at::Tensor> scales = projection.get(1);
        TORCH_CHECK_VALUE(scales.has_value(), "decode_layer needs the scales of packed blocks");
        out = ktinject::block_matmul_cpu(x, weight, *scales, projection.get(2));
    }
    if (const std::optional<at::Tensor> bias = projection.get(3)) out.add_(*bias);
    return out;
}

// One decode token per row of x [B, H] through a whole Llama-style pre-norm decoder layer
// (operators/layer.py, its attention and gated MLP), the very kernels the layer's eager path
// calls one by one, in the same order: RMSNorm, q/k/v projection, rotary embedding and K/V
// write, decode attention over each row's seq_lens positions, output projection, residual add
// and RMSNorm, gate/up projection, SiLU-and-mul, down projection, residual add. One call instead
// of ~25 through Python: the modules' calls and arguments around the kernels were ~40% of an
// eager SmolLM2 Q4_1 step on a 2-core AVX2 EPYC (2026-11-30).
at::Tensor decode_layer_cpu(const at::Tensor& x, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& slots, const at::Tensor& positions,
                            const at::Tensor& seq_lens, const at::Tensor& input_norm,
                            double input_eps, const Projection& qkv, int64_t num_heads,
                            const std::optional<at::Tensor>& q_norm,
                            const std::optional<at::Tensor>& k_norm, double head_eps,
                            double scale, const Projection& o_proj, const at::Tensor& post_norm,
                            double post_eps, const Projection& gate_up,
                            const Projection& down) {
    check_norm(x, input_norm, "decode_layer");
    TORCH_CHECK_VALUE(x.dim() == 2, "decode_layer needs x as [rows, hidden], got ", x.sizes());
    const at::Tensor q =
        rope_write_kv_cpu(project(rms_norm_cpu(x, input_norm, input_eps), qkv), cos, sin,
                          k_cache, v_cache, slots, positions, num_heads, q_norm, k_norm, head_eps);
    const at::Tensor heads =
        ktinject::decode_attention_cpu(q, k_cache, v_cache, slots, seq_lens, scale);
    const auto [normed, residual] =
        add_rms_norm_cpu(project(heads.view({x.size(0), -1}), o_proj), x, post_norm, post_eps);
    return at::add(residual, project(silu_mul_cpu(project(normed, gate_up)), down));
}

}  // namespace

TORCH_LIBRARY_IMPL(ktinject, CPU, m) {
    m.impl("rms_norm", &rms_norm_cpu);
    m.impl("add_rms_norm", &add_rms_norm_cpu);
    m.impl("silu_mul", &silu_mul_cpu);
    m.impl("rope_write_kv", &rope_write_kv_cpu);
    m.impl("decode_layer", &decode_layer_cpu);
}
