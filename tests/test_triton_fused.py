"""Tests for the fused elementwise kernels and their torch references (operators/triton/fused).

Two kinds of checks:

* each ``*_reference`` against the Hugging Face module/function it mirrors (``LlamaRMSNorm``,
  the decoder layer's residual add, ``LlamaMLP``'s ``act_fn(gate) * up``, ``apply_rotary_pos_emb``
  with ``LlamaRotaryEmbedding``'s cos/sin): bit-identical in every dtype, since the reference
  performs the same torch operations;
* each Triton kernel against its reference: within one or two roundings for the norms and SiLU
  (different reduction order, rsqrt/exp implementations), and bit-exact where the math allows it
  (the residual sum and the rotary embedding; bf16 only on a GPU, because the Triton interpreter
  truncates fp32->bf16 casts instead of rounding to nearest even).

Without CUDA the kernels run under the Triton interpreter (conftest.py sets ``TRITON_INTERPRET``
before the kernel module is imported), so shapes stay tiny.  On a GPU the same tests use the
compiler, and a CUDA-graph test replays all four kernels.
"""

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import operators.triton.fused as fmod

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One rounding of the storage dtype is at most 2**-8 (bf16) / 2**-11 (fp16) relative; allow a few
# (interpreted bf16 casts truncate, which doubles the error of each rounding).
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-5, rtol=3 * 2**-10),
    torch.bfloat16: dict(atol=1e-5, rtol=3 * 2**-7),
}
EPS = 1e-5


def exact_casts(dtype: torch.dtype) -> bool:
    """Whether the kernels' fp32->dtype casts round to nearest even, as torch's do."""
    return dtype != torch.bfloat16 or CUDA


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def norm_weight(n, dtype, seed=1):
    return (1.0 + 0.2 * randn(n, seed=seed)).to(dtype)


def rotary(B, T, D, dtype, offset=0):
    """cos/sin exactly as a Llama model computes them (LlamaRotaryEmbedding), [B, T, D]."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=D * 2, num_attention_heads=2, head_dim=D)
    emb = LlamaRotaryEmbedding(config).to(DEVICE)
    positions = torch.arange(offset, offset + T, device=DEVICE).expand(B, T) + 7 * torch.arange(
        B, device=DEVICE
    ).view(B, 1)
    probe = torch.empty(1, device=DEVICE, dtype=dtype)
    return emb(probe, positions)


def fused_qk(B, T, Hq, Hkv, D, dtype, seed=0):
    """q [B, Hq, T, D] and k [B, Hkv, T, D] as operators/attention.py makes them: transposed
    views of one fused qkv projection output [B, T, (Hq + 2 Hkv) D]."""
    qkv = randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, seed=seed)
    q, k, _ = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    return q.view(B, T, Hq, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2)


def assert_close(out, ref, dtype, exact=False):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if exact:
        mismatch = (out != ref).sum().item()
        worst = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
        assert mismatch == 0, f"{mismatch} of {out.numel()} elements differ (max {worst})"
    else:
        torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


# ---------------------------------------------------------------- references vs Hugging Face


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reference_is_hf(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(96, eps=EPS).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(norm_weight(96, dtype))
    x = randn(2, 3, 96, dtype=dtype, scale=3.0)
    with torch.no_grad():
        expected = hf(x)
    assert torch.equal(fmod.rms_norm_reference(x, hf.weight, EPS), expected)


def test_rms_norm_reference_promotes_like_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(64, eps=EPS).to(DEVICE)  # fp32 weight, bf16 activations
    x = randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = hf(x)
    out = fmod.rms_norm_reference(x, hf.weight, EPS)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_reference_is_hf(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(64, eps=EPS).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(norm_weight(64, dtype))
    x, residual = randn(4, 64, dtype=dtype, seed=2), randn(4, 64, dtype=dtype, seed=3)
    hidden = residual + x  # LlamaDecoderLayer: hidden_states = residual + hidden_states
    with torch.no_grad():
        expected = hf(hidden)
    y, new_residual = fmod.add_rms_norm_reference(x, residual, hf.weight, EPS)
    assert torch.equal(new_residual, hidden) and torch.equal(y, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_reference_is_hf_mlp(dtype, monkeypatch):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    # hidden == intermediate so down_proj can be the identity (exact in every dtype): the module
    # output is then HF's act_fn(gate_proj(x)) * up_proj(x) itself.
    size = 64
    config = LlamaConfig(hidden_size=size, intermediate_size=size, hidden_act="silu")
    mlp = LlamaMLP(config).to(device=DEVICE, dtype=dtype)
    if CUDA:  # an identity matmul is only exact without TF32 input rounding
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with torch.no_grad():
        mlp.down_proj.weight.copy_(torch.eye(size))
        x = randn(2, 3, size, dtype=dtype, seed=4)
        gate_up = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
        expected = mlp(x)
    assert torch.equal(fmod.silu_mul_reference(gate_up), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_reference_is_hf(dtype, unsqueeze_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, Hq, Hkv, D = 2, 5, 4, 2, 32
    q, k = fused_qk(B, T, Hq, Hkv, D, dtype)
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = rotary(B, T, D, dtype, offset=3)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    q_ref, k_ref = fmod.rope_reference(q, k, cos, sin, unsqueeze_dim)
    assert torch.equal(q_ref, q_hf) and torch.equal(k_ref, k_hf)


def test_references_reject_bad_shapes():
    x = randn(2, 64)
    with pytest.raises(ValueError, match="weight must have shape"):
        fmod.rms_norm_reference(x, randn(32), EPS)
    with pytest.raises(ValueError, match="residual must match"):
        fmod.add_rms_norm_reference(x, randn(2, 32), randn(64), EPS)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2I\]"):
        fmod.silu_mul_reference(randn(2, 63))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fmod.silu_mul_reference(torch.ones(2, 4, dtype=torch.int32, device=DEVICE))
    q, k = fused_qk(1, 3, 2, 1, 16, torch.float32)
    cos, sin = rotary(1, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        fmod.rope_reference(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="cos must be"):
        fmod.rope_reference(q, k, cos[:, :2], sin, 1)
    with pytest.raises(ValueError, match="disagree"):
        fmod.rope_reference(q, k[:, :, :2], cos, sin, 1)
    with pytest.raises(TypeError, match="share one dtype"):
        fmod.rope_reference(q, k, cos.half(), sin.half(), 1)


def test_use_triton_choice(monkeypatch):
    cpu = torch.zeros(2)
    assert not fmod.use_triton(cpu)
    if CUDA and HAS_TRITON:
        gpu = torch.zeros(2, device="cuda")
        assert fmod.use_triton(gpu)
        assert not fmod.use_triton(gpu.clone().requires_grad_())
        with torch.no_grad():
            assert fmod.use_triton(gpu.clone().requires_grad_())
        monkeypatch.setattr(fmod, "_DISABLED", True)
        assert not fmod.use_triton(gpu)


# ---------------------------------------------------------------- Triton vs reference: RMSNorm


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 64), (3, 96), (2, 2, 128), (1, 576)])
def test_rms_norm_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype, scale=2.0)
    w = norm_weight(shape[-1], dtype)
    out = fmod.rms_norm(x, w, EPS)
    assert out.is_contiguous()
    assert_close(out, fmod.rms_norm_reference(x, w, EPS), dtype)


@needs_triton
def test_rms_norm_wide_rows_and_strided_input():
    # The largest supported hidden size, and rows that are a slice of a wider buffer.
    x = randn(2, fmod.MAX_NORM_DIM, dtype=torch.bfloat16)
    w = norm_weight(fmod.MAX_NORM_DIM, torch.bfloat16)
    assert_close(fmod.rms_norm(x, w, 1e-6), fmod.rms_norm_reference(x, w, 1e-6), torch.bfloat16)
    wide = randn(3, 200, dtype=torch.float16)
    x = wide[:, 8:72]  # row stride 200, last dim contiguous: read in place
    w = norm_weight(64, torch.float16)
    assert_close(fmod.rms_norm(x, w, EPS), fmod.rms_norm_reference(x, w, EPS), torch.float16)
    x = randn(3, 2, 64, dtype=torch.float16).transpose(0, 1)  # rows do not flatten: copied
    out = fmod.rms_norm(x, w, EPS)
    assert out.shape == x.shape and out.is_contiguous()
    assert_close(out, fmod.rms_norm_reference(x, w, EPS), torch.float16)


@needs_triton
def test_rms_norm_fp32_weight_promotes():
    x = randn(3, 64, dtype=torch.bfloat16)
    w = norm_weight(64, torch.float32)
    out = fmod.rms_norm(x, w, EPS)
    ref = fmod.rms_norm_reference(x, w, EPS)
    assert out.dtype == torch.float32
    # The normalised activations are rounded to bf16 before the fp32 weight multiply.
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


@needs_triton
@settings(max_examples=10, deadline=None)
@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 200),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_random_shapes(rows, n, dtype, seed):
    x = randn(rows, n, dtype=dtype, seed=seed, scale=4.0)
    w = norm_weight(n, dtype, seed=seed + 1)
    assert_close(fmod.rms_norm(x, w, EPS), fmod.rms_norm_reference(x, w, EPS), dtype)


@needs_triton
def test_rms_norm_rejects_bad_arguments():
    w = randn(64)
    with pytest.raises(ValueError, match="supports last dims"):
        fmod.rms_norm(randn(1, fmod.MAX_NORM_DIM + 1), randn(fmod.MAX_NORM_DIM + 1), EPS)
    with pytest.raises(ValueError, match="must be contiguous"):
        fmod.rms_norm(randn(64, 2).t(), w, EPS)
    with pytest.raises(ValueError, match="weight must have shape"):
        fmod.rms_norm(randn(2, 64), randn(65), EPS)
    with pytest.raises(TypeError):
        fmod.rms_norm(randn(2, 64).double(), w, EPS)


# ---------------------------------------------------------------- Triton vs reference: add + norm


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 64), (1, 3, 96)])
def test_add_rms_norm_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype, seed=5)
    residual = randn(*shape, dtype=dtype, seed=6, scale=3.0)
    w = norm_weight(shape[-1], dtype)
    y, new_residual = fmod.add_rms_norm(x, residual, w, EPS)
    y_ref, res_ref = fmod.add_rms_norm_reference(x, residual, w, EPS)
    assert_close(new_residual, res_ref, dtype, exact=exact_casts(dtype))
    assert_close(y, y_ref, dtype)
    assert new_residual.data_ptr() not in (x.data_ptr(), residual.data_ptr())


@needs_triton
@settings(max_examples=10, deadline=None)
@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 160),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_add_rms_norm_random_shapes(rows, n, dtype, seed):
    x = randn(rows, n, dtype=dtype, seed=seed)
    residual = randn(rows, n, dtype=dtype, seed=seed + 1, scale=2.0)
    w = norm_weight(n, dtype, seed=seed + 2)
    y, new_residual = fmod.add_rms_norm(x, residual, w, EPS)
    y_ref, res_ref = fmod.add_rms_norm_reference(x, residual, w, EPS)
    assert_close(new_residual, res_ref, dtype, exact=exact_casts(dtype))
    assert_close(y, y_ref, dtype)


@needs_triton
def test_add_rms_norm_rejects_mismatch():
    with pytest.raises(ValueError, match="residual must match"):
        fmod.add_rms_norm(randn(2, 64), randn(2, 64, dtype=torch.float16), randn(64), EPS)


# ---------------------------------------------------------------- Triton vs reference: SiLU * up


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 128), (1, 3, 200), (1, 2 * 2500)])
def test_silu_mul_matches_reference(dtype, shape):
    # I = 2500 spans two column blocks of 2048; large |gate| exercises both tails of silu.
    gate_up = randn(*shape, dtype=dtype, seed=7, scale=4.0)
    out = fmod.silu_mul(gate_up)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close(out, fmod.silu_mul_reference(gate_up), dtype)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter
def test_silu_mul_extreme_gates():
    gate = torch.tensor([-200.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0], device=DEVICE)
    gate_up = torch.cat([gate, torch.full_like(gate, 1.5)])[None]
    out = fmod.silu_mul(gate_up)
    assert torch.isfinite(out).all()
    assert_close(out, fmod.silu_mul_reference(gate_up), torch.float32)


@needs_triton
@settings(max_examples=10, deadline=None)
@given(
    rows=st.integers(1, 4),
    inter=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_silu_mul_random_shapes(rows, inter, dtype, seed):
    gate_up = randn(rows, 2 * inter, dtype=dtype, seed=seed, scale=3.0)
    assert_close(fmod.silu_mul(gate_up), fmod.silu_mul_reference(gate_up), dtype)


@needs_triton
def test_silu_mul_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\[\.\.\., 2I\]"):
        fmod.silu_mul(randn(2, 7))
    with pytest.raises(ValueError, match="must be contiguous"):
        fmod.silu_mul(randn(8, 2).t())


# ---------------------------------------------------------------- Triton vs reference: RoPE


def _check_rope(q, k, cos, sin, unsqueeze_dim=1):
    q_out, k_out = fmod.rope(q, k, cos, sin, unsqueeze_dim)
    q_ref, k_ref = fmod.rope_reference(q, k, cos, sin, unsqueeze_dim)
    for out, ref, x in ((q_out, q_ref, q), (k_out, k_ref, k)):
        if exact_casts(x.dtype):
            assert_close(out, ref, x.dtype, exact=True)
        else:
            # Interpreted bf16: each of the three truncations (two products, one sum) may lose
            # up to one ulp of a value bounded by max|x| (|cos|, |sin| <= 1); the sum cancels, so
            # the bound is absolute.
            atol = 4 * torch.finfo(x.dtype).eps * x.abs().max().item()
            torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)
    # Memory is [B, T, H, D]: merging the heads back needs no copy.
    B, T = q_out.shape[0], q_out.shape[3 - unsqueeze_dim]
    bthd = q_out.transpose(1, 2) if unsqueeze_dim == 1 else q_out
    assert bthd.is_contiguous() and bthd.reshape(B, T, -1).data_ptr() == q_out.data_ptr()
    return q_out, k_out


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (4, 4, 16), (2, 1, 96)])
def test_rope_matches_reference_on_fused_qkv_views(dtype, Hq, Hkv, D):
    # attention.py's layout (transposed views of one qkv buffer); 9/3/64 is SmolLM2's, D = 96
    # has a non-power-of-two half.
    B, T = 2, 3
    q, k = fused_qk(B, T, Hq, Hkv, D, dtype)
    cos, sin = rotary(B, T, D, dtype, offset=5)
    _check_rope(q, k, cos, sin)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_bthd_layout_and_contiguous_bhtd(dtype):
    B, T, Hq, Hkv, D = 1, 4, 4, 2, 32
    q, k = fused_qk(B, T, Hq, Hkv, D, dtype, seed=3)
    cos, sin = rotary(B, T, D, dtype)
    _check_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    _check_rope(q.contiguous(), k.contiguous(), cos, sin, unsqueeze_dim=1)  # HF's own layout


@needs_triton
def test_rope_decode_step_and_broadcast_cos():
    # One token per row (decode), cos/sin [1, T, D] broadcast over the batch, and D = 256 so a
    # program takes 8 heads: the 16 heads span two programs, the second holding q and k heads.
    B, T, Hq, Hkv, D = 3, 1, 12, 4, 256
    q, k = fused_qk(B, T, Hq, Hkv, D, torch.float16, seed=9)
    cos, sin = rotary(1, T, D, torch.float16, offset=40)
    _check_rope(q, k, cos, sin)


@needs_triton
@settings(max_examples=10, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 4),
    heads=st.sampled_from([(1, 1), (2, 1), (3, 3), (6, 2)]),
    D=st.sampled_from([2, 16, 40, 64]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_rope_random_shapes(B, T, heads, D, dtype, layout, seed):
    Hq, Hkv = heads
    q, k = fused_qk(B, T, Hq, Hkv, D, dtype, seed=seed)
    if layout == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = rotary(B, T, D, dtype, offset=seed % 1000)
    _check_rope(q, k, cos, sin, layout)


@needs_triton
def test_rope_rejects_bad_arguments():
    q, k = fused_qk(1, 2, 2, 1, 16, torch.float32)
    cos, sin = rotary(1, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="even head dim"):
        fmod.rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="must be contiguous"):
        fmod.rope(q, k, cos.transpose(0, 2).contiguous().transpose(0, 2), sin)
    big_q, big_k = fused_qk(1, 1, 1, 1, 1024, torch.float32)
    big_cos, big_sin = rotary(1, 1, 1024, torch.float32)
    with pytest.raises(ValueError, match="head dims up to"):
        fmod.rope(big_q, big_k, big_cos, big_sin)


@needs_triton
def test_empty_inputs():
    assert fmod.rms_norm(randn(0, 64), randn(64), EPS).shape == (0, 64)
    y, r = fmod.add_rms_norm(randn(0, 64), randn(0, 64), randn(64), EPS)
    assert y.shape == r.shape == (0, 64)
    assert fmod.silu_mul(randn(0, 8)).shape == (0, 4)
    q, k = fused_qk(1, 0, 2, 1, 16, torch.float32)
    cos, sin = rotary(1, 0, 16, torch.float32)
    q_out, k_out = fmod.rope(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rounding_points(dtype):
    """The kernels round where HF rounds.  With round-to-nearest casts, rms_norm, add_rms_norm
    and silu_mul then agree with torch bit for bit except where an fp32 rsqrt/exp/sum that
    differs in its last bits straddles a rounding boundary: well under 1% of the elements, one ulp
    at most -- except silu_mul, where a one-ulp difference in the rounded silu(gate) is multiplied
    by `up`, which can carry it to two ulps of the product (seen in fp16 on an H200, whose tl.exp
    is an approximation).  Skipping any of HF's intermediate roundings makes ~25-35% differ."""
    if not exact_casts(dtype):
        pytest.skip("the Triton interpreter truncates fp32->bf16 casts")
    eps = torch.finfo(dtype).eps
    x = randn(4, 576, dtype=dtype, seed=11)
    residual = randn(4, 576, dtype=dtype, seed=12, scale=3.0)
    w = norm_weight(576, dtype)
    gate_up = randn(4, 2 * 1536, dtype=dtype, seed=13, scale=3.0)
    pairs = {
        "rms_norm": (fmod.rms_norm(x, w, EPS), fmod.rms_norm_reference(x, w, EPS)),
        "add_rms_norm": (
            fmod.add_rms_norm(x, residual, w, EPS)[0],
            fmod.add_rms_norm_reference(x, residual, w, EPS)[0],
        ),
        "silu_mul": (fmod.silu_mul(gate_up), fmod.silu_mul_reference(gate_up)),
    }
    for name, (out, ref) in pairs.items():
        differ = (out != ref).float().mean().item()
        assert differ <= 0.01, f"{name}: {differ:.1%} of the elements differ from torch"
        ulps = 2 if name == "silu_mul" else 1
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-6, rtol=ulps * eps, msg=name)


# ---------------------------------------------------------------- CUDA only: graph capture


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_of_all_kernels():
    dtype = torch.bfloat16
    B, T, H, inter, Hq, Hkv, D = 1, 1, 576, 1536, 9, 3, 64
    x = randn(B, T, H, dtype=dtype)
    residual = randn(B, T, H, dtype=dtype, seed=1)
    w = norm_weight(H, dtype)
    gate_up = randn(B, T, 2 * inter, dtype=dtype, seed=2)
    q, k = fused_qk(B, T, Hq, Hkv, D, dtype, seed=3)
    cos, sin = rotary(B, T, D, dtype)

    def step():
        return (
            fmod.rms_norm(x, w, EPS),
            *fmod.add_rms_norm(x, residual, w, EPS),
            fmod.silu_mul(gate_up),
            *fmod.rope(q, k, cos, sin),
        )

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (10, 20):
        for i, t in enumerate((x, residual, gate_up, q, k)):
            t.copy_(randn(*t.shape, dtype=dtype, seed=seed + i))
        cos_new, sin_new = rotary(B, T, D, dtype, offset=seed)
        cos.copy_(cos_new)
        sin.copy_(sin_new)
        graph.replay()
        refs = (
            fmod.rms_norm_reference(x, w, EPS),
            *fmod.add_rms_norm_reference(x, residual, w, EPS),
            fmod.silu_mul_reference(gate_up),
            *fmod.rope_reference(q, k, cos, sin),
        )
        for out, ref in zip(outs, refs, strict=True):
            assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_reference(dtype: torch.dtype) -> None:
    """One launch writes each row's K and V at its slot and position; nothing else changes."""
    from operators.triton.fused import write_kv, write_kv_reference

    slots_n, heads, length, dim = 3, 2, 8, 16
    kv = torch.randn(2, 3, heads, 4, dim, dtype=dtype, device=DEVICE)[:, :, :, 1]  # strided rows
    caches = [
        torch.randn(slots_n, heads, length, dim, dtype=dtype, device=DEVICE) for _ in range(2)
    ]
    expected = [c.clone() for c in caches]
    slots = torch.tensor([2, 0, 1], device=DEVICE)
    positions = torch.tensor([[7], [0], [3]], device=DEVICE)[:, 0]
    write_kv_reference(kv[0], kv[1], *expected, slots, positions)
    write_kv(kv[0], kv[1], *caches, slots, positions)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("Hq", "Hkv", "D"), [(4, 2, 16), (9, 3, 64), (2, 2, 96)])
def test_rope_write_kv_is_rope_then_write_kv(dtype, Hq, Hkv, D) -> None:
    """The decode step's fused launch: the rotated q it returns and the caches it writes equal
    `rope` followed by `write_kv` (bit for bit: the same rounding points, no FMA)."""
    B, slots_n, length = 3, 4, 8
    qkv = randn(B, 1, (Hq + 2 * Hkv) * D, dtype=dtype, seed=5)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.view(B, 1, -1, D).transpose(1, 2) for t in (q, k, v))
    cos, sin = rotary(B, 1, D, dtype, offset=3)
    caches = [randn(slots_n, Hkv, length, D, dtype=dtype, seed=s) for s in (6, 7)]
    expected = [c.clone() for c in caches]
    slots = torch.tensor([2, 0, 3], device=DEVICE)
    positions = torch.tensor([[7], [0], [4]], device=DEVICE)[:, 0]

    q_ref, k_ref = fmod.rope(q, k, cos, sin)
    fmod.write_kv_reference(k_ref[:, :, 0], v[:, :, 0], *expected, slots, positions)
    q_out = fmod.rope_write_kv(q, k, v, cos, sin, *caches, slots, positions)
    assert_close(q_out, q_ref, dtype, exact=True)
    for cache, reference in zip(caches, expected, strict=True):
        assert_close(cache, reference, dtype, exact=True)


@needs_triton
def test_rope_write_kv_broadcasts_cos_sin_over_the_batch() -> None:
    """Position embeddings shared by every row ([1, 1, D]) are read with a zero batch stride."""
    B, Hq, Hkv, D = 3, 4, 2, 32
    qkv = randn(B, 1, (Hq + 2 * Hkv) * D, dtype=torch.float32, seed=11)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.view(B, 1, -1, D).transpose(1, 2) for t in (q, k, v))
    cos, sin = rotary(1, 1, D, torch.float32, offset=5)
    caches = [torch.zeros(B, Hkv, 8, D, device=DEVICE) for _ in range(2)]
    expected = [c.clone() for c in caches]
    slots, positions = torch.arange(B, device=DEVICE), torch.tensor([1, 6, 3], device=DEVICE)
    q_ref, k_ref = fmod.rope_reference(q, k, cos.expand(B, 1, D), sin.expand(B, 1, D))
    fmod.write_kv_reference(k_ref[:, :, 0], v[:, :, 0], *expected, slots, positions)
    q_out = fmod.rope_write_kv(q, k, v, cos, sin, *caches, slots, positions)
    assert_close(q_out, q_ref, torch.float32, exact=True)
    for cache, reference in zip(caches, expected, strict=True):
        assert_close(cache, reference, torch.float32, exact=True)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_folds_per_head_norms(dtype) -> None:
    """Qwen3's per-head q/k RMSNorms inside the same launch: equal to rms_norm_reference per
    head, then rope, then write_kv (within the norms' last-bit tolerance)."""
    B, Hq, Hkv, D = 2, 4, 2, 64
    qkv = randn(B, 1, (Hq + 2 * Hkv) * D, dtype=dtype, seed=13, scale=3.0)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.view(B, 1, -1, D) for t in (q, k, v))
    q_w, k_w = norm_weight(D, dtype, seed=14), norm_weight(D, dtype, seed=15)
    cos, sin = rotary(B, 1, D, dtype, offset=2)
    caches = [torch.zeros(3, Hkv, 8, D, dtype=dtype, device=DEVICE) for _ in range(2)]
    expected = [c.clone() for c in caches]
    slots, positions = torch.tensor([2, 0], device=DEVICE), torch.tensor([7, 1], device=DEVICE)
    q_n = fmod.rms_norm_reference(q, q_w, EPS).transpose(1, 2)
    k_n = fmod.rms_norm_reference(k, k_w, EPS).transpose(1, 2)
    q_ref, k_ref = fmod.rope_reference(q_n, k_n, cos, sin)
    fmod.write_kv_reference(k_ref[:, :, 0], v.transpose(1, 2)[:, :, 0], *expected, slots, positions)
    q_out = fmod.rope_write_kv(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        cos,
        sin,
        *caches,
        slots,
        positions,
        head_norms=(q_w, k_w, EPS),
    )
    # rotation sums products of either sign, so errors are bounded relative to the scale of
    # the values (interpreted bf16 casts truncate, compounding norm and rotation roundings)
    step = {torch.float32: 2e-6, torch.float16: 2**-9, torch.bfloat16: 2**-5}[dtype]
    for out, ref in ((q_out, q_ref), *zip(caches, expected, strict=True)):
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), atol=step * scale, rtol=0)
