"""Tests for the flash-decoding kernel and its torch reference (operators/triton/decode_attention).

Without CUDA the Triton kernels run under the Triton interpreter: Triton picks compile vs.
interpret when a kernel is *decorated* (when the kernel module is imported), so conftest.py sets
``TRITON_INTERPRET`` before any test module imports one.

The interpreter is slow (100-7000x torch), so shapes stay tiny: a short split length forces
several splits on caches of a few dozen positions.  On a GPU the same tests use the compiler.
"""

import importlib.util
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import operators.triton.decode_attention as dmod

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

decode_attention = dmod.decode_attention
decode_attention_reference = dmod.decode_attention_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def make_case(
    B, Hq, Hkv, L, D, seq_lens, *, S=None, slots=None, dtype=torch.float32, seed=0, nan_tail=True
):
    """Random q and caches; every cache position no row may read is NaN (when nan_tail)."""
    S = S if S is not None else B + 1
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=gen)
    k = torch.randn(S, Hkv, L, D, generator=gen)
    v = torch.randn(S, Hkv, L, D, generator=gen)
    if slots is None:
        slots = torch.randperm(S, generator=gen)[:B]
    slots = torch.as_tensor(slots, dtype=torch.int64)
    seq_lens = torch.as_tensor(seq_lens)
    if nan_tail:
        readable = torch.zeros(S, L, dtype=torch.bool)
        for b in range(B):
            readable[slots[b], : int(seq_lens[b])] = True
        k[~readable[:, None, :, None].expand_as(k)] = float("nan")
        v[~readable[:, None, :, None].expand_as(v)] = float("nan")
    to = dict(device=DEVICE)
    return (
        q.to(dtype=dtype, **to),
        k.to(dtype=dtype, **to),
        v.to(dtype=dtype, **to),
        slots.to(**to),
        seq_lens.to(**to),
    )


def naive_oracle(q, k_cache, v_cache, slots, seq_lens, scale):
    """Per-row, per-head loop in float64 over exactly the valid prefix."""
    q, k_cache, v_cache = (t.cpu().double() for t in (q, k_cache, v_cache))
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    out = torch.empty(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n, s = int(seq_lens[b]), int(slots[b])
        for h in range(Hq):
            k = k_cache[s, h // group, :n]
            v = v_cache[s, h // group, :n]
            out[b, h] = torch.softmax(k @ q[b, h] * scale, dim=0) @ v
    return out


# ---------------------------------------------------------------- reference vs naive oracle


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("len_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("max_len", [None, 24, 30], ids=["host-read", "bound", "loose-bound"])
def test_reference_matches_naive_loop(Hq, Hkv, len_dtype, max_len):
    """`max_len` (a bound the caller knows without reading seq_lens) never changes the result."""
    L, D = 24, 16
    seq_lens = torch.tensor([1, 9, L], dtype=len_dtype)
    q, k, v, slots, lens = make_case(3, Hq, Hkv, L, D, seq_lens, S=5)
    scale = D**-0.5
    out = decode_attention_reference(q, k, v, slots, lens, scale, max_len)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.cpu().double(), naive_oracle(q, k, v, slots, lens, scale), atol=1e-5, rtol=1e-5
    )


def test_reference_low_precision_returns_q_dtype():
    q, k, v, slots, lens = make_case(2, 4, 2, 16, 16, [3, 16], dtype=torch.bfloat16)
    out = decode_attention_reference(q, k, v, slots, lens, 0.25)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(
        out.cpu().double(), naive_oracle(q, k, v, slots, lens, 0.25), atol=2e-2, rtol=2e-2
    )


def test_reference_rejects_bad_shapes():
    q, k, v, slots, lens = make_case(2, 3, 2, 8, 16, [1, 2], nan_tail=False)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention_reference(q, k, v, slots, lens, 1.0)


# ---------------------------------------------------------------- Triton vs reference


def _check_triton(q, k, v, slots, lens, scale, **kw):
    """Both ways of merging the splits: a second launch, and the last split of each (row, kv
    head) merging them itself (`counters`), which must leave its counters at zero."""
    ref = decode_attention_reference(q, k, v, slots, lens, scale)
    counters = torch.zeros((q.shape[0] + 1, k.shape[1] + 1), dtype=torch.int32, device=q.device)
    for merge in ({}, {"counters": counters}):
        out = decode_attention(q, k, v, slots, lens, scale, **kw, **merge)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert torch.isfinite(out).all(), "garbage (NaN) past seq_len leaked into the output"
        torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype])
    assert not counters.any()
    return out


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2)])
@pytest.mark.parametrize("split_len,block_n", [(16, 16), (32, 16)])
def test_triton_matches_reference(dtype, Hq, Hkv, split_len, block_n):
    # L = 48 with split 16: seq_len 1, exactly one split, one past a split boundary, all of L.
    L, D = 48, 64
    q, k, v, slots, lens = make_case(
        4, Hq, Hkv, L, D, torch.tensor([1, 16, 17, L], dtype=torch.int32), dtype=dtype, S=6
    )
    _check_triton(q, k, v, slots, lens, D**-0.5, split_len=split_len, block_n=block_n)


@needs_triton
@pytest.mark.parametrize("D", [16, 96, 128])
def test_triton_head_dims(D):
    # 96 is not a power of two: padded to 128 and masked.
    q, k, v, slots, lens = make_case(2, 4, 2, 40, D, torch.tensor([40, 23]), dtype=torch.float16)
    _check_triton(q, k, v, slots, lens, D**-0.5, split_len=16)


@needs_triton
@pytest.mark.parametrize("L,lens", [(40, [1, 40, 33]), (130, [130, 1, 64])])
def test_triton_default_split_len(L, lens):
    # L=40: one split (the split kernel normalises and writes the output itself);
    # L=130: default split 64 -> 3 splits plus the merge kernel.
    q, k, v, slots, seq_lens = make_case(3, 2, 1, L, 16, torch.tensor(lens, dtype=torch.int64))
    _check_triton(q, k, v, slots, seq_lens, 0.3)


@needs_triton
def test_triton_noncontiguous_q_and_reused_slot():
    B, Hq, Hkv, L, D = 3, 4, 2, 32, 16
    _, k, v, _, lens = make_case(B, Hq, Hkv, L, D, [5, 32, 20], slots=[1, 0, 1], S=2)
    # Rows 0 and 2 share slot 1 with different lengths; k/v NaN only where no row reads.
    qkv = torch.randn(B, Hq, 3 * D, device=DEVICE)
    q = qkv[:, :, D : 2 * D]
    slots = torch.tensor([1, 0, 1], device=DEVICE)
    _check_triton(q, k, v, slots, lens, D**-0.5, split_len=16)


@needs_triton
@settings(max_examples=10, deadline=None)
@given(
    data=st.data(),
    gqa=st.sampled_from([(2, 2), (4, 2), (2, 1)]),
    seed=st.integers(0, 2**16),
)
def test_triton_random_seq_lens(data, gqa, seed):
    Hq, Hkv = gqa
    L, D, S = 48, 16, 4
    B = data.draw(st.integers(1, 3), label="B")
    lens = data.draw(st.lists(st.integers(1, L), min_size=B, max_size=B), label="seq_lens")
    slots = data.draw(st.permutations(range(S)), label="slots")[:B]
    q, k, v, slots_t, lens_t = make_case(
        B, Hq, Hkv, L, D, torch.tensor(lens, dtype=torch.int32), S=S, slots=slots, seed=seed
    )
    _check_triton(q, k, v, slots_t, lens_t, D**-0.5, split_len=16)


@needs_triton
def test_triton_rejects_bad_arguments():
    q, k, v, slots, lens = make_case(1, 2, 1, 16, 16, [4], nan_tail=False)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k, v, slots, lens, 1.0, split_len=24)
    with pytest.raises(ValueError, match="divide"):
        decode_attention(q, k, v, slots, lens, 1.0, split_len=16, block_n=32)
    big = torch.zeros(1, 2, 512, device=DEVICE)
    kbig = torch.zeros(1, 1, 16, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        decode_attention(big, kbig, kbig, slots, lens, 1.0)


# ---------------------------------------------------------------- the new token rotated in-kernel


def new_token(B, Hq, Hkv, D, dtype, *, seed, broadcast=False):
    """Unrotated q, k, v of one token per row (views of a fused qkv row, as the attention
    operator passes them) and cos/sin rows ([1, D] when `broadcast`)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=gen).to(dtype=dtype, device=DEVICE)
    q, k, v = (t.view(B, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1))
    angles = torch.rand(1 if broadcast else B, D // 2, generator=gen) * 6.0
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, v, angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


def rotate_then_attend(q, k, v, cos, sin, caches, slots, lens, split_len, head_norms=None):
    """The two-launch path the merged kernel replaces: rope_write_kv, then decode_attention."""
    from operators.triton.fused import rope_write_kv

    positions = lens.to(torch.int64) - 1
    q_rot = rope_write_kv(
        q[:, :, None],
        k[:, :, None],
        v[:, :, None],
        cos[:, None],
        sin[:, None],
        *caches,
        slots,
        positions,
        head_norms=head_norms,
    )
    return decode_attention(
        q_rot[:, :, 0], *caches, slots, lens, q.shape[-1] ** -0.5, split_len=split_len
    )


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("Hq", "Hkv", "D"), [(4, 2, 16), (9, 3, 64), (2, 2, 96)])
@pytest.mark.parametrize("merge", ["counters", "second-launch", "one-split"])
def test_new_token_rotated_in_kernel_equals_rope_write_kv_then_attention(dtype, Hq, Hkv, D, merge):
    """The fused decode graph's attention: rotation of q and the new k, and the K/V write, in
    the same launch. The caches it leaves are bit-identical to rope_write_kv's; its output
    equals the two-launch path's up to the order of the fp32 q.k sums (two halves). New
    positions: the first of the cache, the last of a split, the first of the next, the last."""
    B, S, L = 4, 5, 48
    q, k, v, cos, sin = new_token(B, Hq, Hkv, D, dtype, seed=3, broadcast=D == 96)
    lens = torch.tensor([1, 16, 17, L], device=DEVICE)
    slots = torch.tensor([4, 0, 2, 1], device=DEVICE)
    gen = torch.Generator().manual_seed(4)
    base = [torch.randn(S, Hkv, L, D, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    split_len = 64 if merge == "one-split" else 16
    expected_caches = [c.clone() for c in base]
    expected = rotate_then_attend(q, k, v, cos, sin, expected_caches, slots, lens, split_len)
    caches = [c.clone() for c in base]
    counters = torch.zeros(B, Hkv, dtype=torch.int32, device=DEVICE)
    out = decode_attention(
        q,
        *caches,
        slots,
        lens,
        D**-0.5,
        split_len=split_len,
        counters=counters if merge == "counters" else None,
        new_kv=(k, v, cos, sin),
    )
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
    torch.testing.assert_close(out, expected, **TOL[dtype])
    assert not counters.any()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_token_rotation_folds_per_head_norms(dtype):
    """Qwen3: each q and k head RMS-normalised before its rotation, as rope_write_kv does."""
    B, Hq, Hkv, D, S, L = 2, 4, 2, 32, 3, 32
    q, k, v, cos, sin = new_token(B, Hq, Hkv, D, dtype, seed=8)
    gen = torch.Generator().manual_seed(9)
    norms = (*(torch.rand(D, generator=gen).add(0.5).to(dtype).to(DEVICE) for _ in range(2)), 1e-6)
    lens, slots = torch.tensor([9, 32], device=DEVICE), torch.tensor([2, 0], device=DEVICE)
    base = [torch.randn(S, Hkv, L, D, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    expected_caches = [c.clone() for c in base]
    expected = rotate_then_attend(
        q, k, v, cos, sin, expected_caches, slots, lens, 16, head_norms=norms
    )
    caches = [c.clone() for c in base]
    out = decode_attention(
        q, *caches, slots, lens, D**-0.5, split_len=16, new_kv=(k, v, cos, sin), head_norms=norms
    )
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
    torch.testing.assert_close(out, expected, **TOL[dtype])


@needs_triton
def test_new_token_rotation_rejects_bad_operands():
    B, Hq, Hkv, D = 2, 4, 2, 16
    q, k, v, cos, sin = new_token(B, Hq, Hkv, D, torch.float32, seed=1)
    caches = [torch.zeros(3, Hkv, 16, D, device=DEVICE) for _ in range(2)]
    slots, lens = torch.tensor([0, 1], device=DEVICE), torch.tensor([3, 4], device=DEVICE)
    weights = (torch.ones(D, device=DEVICE), torch.ones(D, device=DEVICE), 1e-6)
    cases = [
        ({"head_norms": weights}, "pass new_kv too"),
        ({"new_kv": (k[:, :1], v, cos, sin)}, "must be [B, Hkv, D]"),
        ({"new_kv": (k, v, cos[:, :8], sin)}, "cos must be"),
        ({"new_kv": (k.half(), v, cos, sin)}, "must share one dtype"),
        ({"new_kv": (k, v, cos, sin), "head_norms": (weights[0][:8], *weights[1:])}, "weight (8,)"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            decode_attention(q, *caches, slots, lens, 0.25, **kwargs)
    odd = torch.zeros(B, Hq, 15, device=DEVICE)
    with pytest.raises(ValueError, match="even head dim"):
        odd_kv = torch.zeros(B, Hkv, 15, device=DEVICE)
        odd_cache = torch.zeros(3, Hkv, 16, 15, device=DEVICE)
        decode_attention(
            odd, odd_cache, odd_cache, slots, lens, 0.25, new_kv=(odd_kv, odd_kv, cos, sin)
        )


# ---------------------------------------------------------------- CUDA only: graph capture


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_triton_cuda_graph_replay_with_new_lengths():
    B, Hq, Hkv, L, D = 4, 8, 2, 1024, 128
    q, k, v, slots, lens = make_case(
        B, Hq, Hkv, L, D, torch.tensor([1, 255, 256, L], dtype=torch.int32), dtype=torch.bfloat16
    )
    scale = D**-0.5
    decode_attention(q, k, v, slots, lens, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, slots, lens, scale)
    for new_lens in ([L, 3, 700, 257], [1, 1, 1, 1], [1, 255, 256, L]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        # make_case put NaN past the original lengths; use finite data for the replays
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        q.copy_(torch.randn_like(q))
        graph.replay()
        ref = decode_attention_reference(q, k, v, slots, lens, scale)
        torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])
