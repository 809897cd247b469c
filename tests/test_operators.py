"""Each operator against the module it replaces: same inputs, outputs within fp32 tolerance.

Tolerances: fp32 atol 1e-5 (operators reorder nothing but fuse matmuls); bf16 2e-2 relative.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from assertions import assert_matches_oracle
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from ktinject.cache import AttentionContext, StaticKVCache, use_context
from operators.attention import StaticCacheAttention
from operators.experts import GATHER_ROWS, GatheredExperts
from operators.mlp import FusedGatedMLP
from operators.norm import RMSNorm
from operators.rope import RotaryTable
from operators.triton.gemv import prefer_fused_gemv


def build(cls, module: torch.nn.Module, model: torch.nn.Module, name: str) -> torch.nn.Module:
    return cls.from_module(module, name=name, config=model.config, device=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf(dtype: torch.dtype) -> None:
    model = tiny_model("llama", dtype=dtype)
    original = model.model.layers[0].input_layernorm
    operator = build(RMSNorm, original, model, "model.layers.0.input_layernorm")
    x = torch.randn(2, 5, model.config.hidden_size, dtype=dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(operator(x), original(x), **tol)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "deepseek_v3"])
def test_fused_mlp_matches_hf(arch: str) -> None:
    model = tiny_model(arch)
    original = model.model.layers[0].mlp
    operator = build(FusedGatedMLP, original, model, "model.layers.0.mlp")
    x = torch.randn(2, 5, model.config.hidden_size)
    torch.testing.assert_close(operator(x), original(x), atol=1e-5, rtol=1e-5)


def test_fused_mlp_loads_original_state_dict_keys() -> None:
    model = tiny_model("llama")
    original = model.model.layers[0].mlp
    state = {k: v.clone() for k, v in original.state_dict().items()}
    operator = build(FusedGatedMLP, tiny_model("llama", seed=1).model.layers[0].mlp, model, "mlp")
    operator.load_state_dict(state)
    x = torch.randn(1, 3, model.config.hidden_size)
    torch.testing.assert_close(operator(x), original(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral", "qwen3_moe", "olmoe"])
def test_static_attention_matches_hf_outside_engine(arch: str) -> None:
    """Outside an engine context the operator is the HF module (HF cache and mask)."""
    model = tiny_model(arch)
    original = model.model.layers[0].self_attn
    operator = build(StaticCacheAttention, original, model, "model.layers.0.self_attn")
    hidden = torch.randn(1, 6, model.config.hidden_size)
    positions = torch.arange(6)[None]
    rope = model.model.rotary_emb(hidden, positions)
    expected, _ = original(hidden, position_embeddings=rope, attention_mask=None)
    actual, _ = operator(hidden, position_embeddings=rope, attention_mask=None)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_static_attention_rejects_sliding_window() -> None:
    from ktinject.errors import RuleError

    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    attention = model.model.layers[1].self_attn
    with pytest.raises(RuleError, match="sliding window of 8 tokens"):
        build(StaticCacheAttention, attention, model, "model.layers.1.self_attn")


@pytest.mark.parametrize("arch", ["llama", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("fused", [False, True])
def test_fused_residual_layer_matches_hf(arch: str, fused: bool, monkeypatch) -> None:
    """Both paths: torch on CPU, and the Triton add_rms_norm (interpreted here, compiled on GPU)."""
    import operators.layer
    from operators.layer import FusedResidualDecoderLayer

    monkeypatch.setattr(operators.layer, "use_triton", lambda tensor: fused)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton needs CUDA tensors
    model = tiny_model(arch).to(device)
    original = model.model.layers[1]
    operator = build(FusedResidualDecoderLayer, original, model, "model.layers.1")
    hidden = torch.randn(1, 5, model.config.hidden_size, device=device)
    rope = model.model.rotary_emb(hidden, torch.arange(5, device=device)[None])
    expected = original(hidden, position_embeddings=rope, attention_mask=None)
    actual = operator(hidden, position_embeddings=rope, attention_mask=None)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("tokens", [1, GATHER_ROWS, 3 * GATHER_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("graph_safe", [True, False], ids=["graph-safe", "cpu-eager"])
def test_gathered_experts_match_hf(
    arch: str, tokens: int, dtype: torch.dtype, graph_safe: bool, monkeypatch
) -> None:
    """Up to GATHER_ROWS tokens take the gathered path where no host read is allowed (GPU,
    torch.compile), the grouped loop otherwise and for more tokens; both vs HF's."""
    import operators.experts

    monkeypatch.setattr(operators.experts, "graph_safe", lambda tensor: graph_safe)
    real = GatheredExperts._gathered
    gathered = mock.patch.object(GatheredExperts, "_gathered", autospec=True, side_effect=real)
    model = tiny_model(arch, dtype=dtype)
    layer = 1 if arch == "deepseek_v3" else 0  # DeepSeek's layer 0 is dense
    original = model.model.layers[layer].mlp.experts
    operator = build(GatheredExperts, original, model, f"model.layers.{layer}.mlp.experts")
    k, experts = 2, original.gate_up_proj.shape[0]
    hidden = torch.randn(tokens, model.config.hidden_size, dtype=dtype)
    index = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k).softmax(-1).to(dtype)
    with gathered as spy:
        actual = operator(hidden, index, weights)
    assert_matches_oracle(actual, original(hidden, index, weights))
    assert spy.call_count == int(graph_safe and tokens <= GATHER_ROWS)


GPU_BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a GPU: the interpreter's bf16 casts truncate (tests/test_triton_experts.py "
        "checks interpreted bf16 against the torch reference at that tolerance)",
    ),
)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("tokens", [1, 3 * GATHER_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, GPU_BF16])
def test_experts_read_in_place_in_a_capture_match_hf(
    arch: str, tokens: int, dtype: torch.dtype, monkeypatch
) -> None:
    """Inside a capture (any number of tokens: the server captures up to --max-batch-size rows)
    the fused decode step's experts run the in-place Triton kernels; vs HF's."""
    import operators.experts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("use_triton", "graph_safe", "host_reads_forbidden"):
        monkeypatch.setattr(operators.experts, name, lambda tensor: True)
    in_place = mock.patch.object(
        operators.experts, "gathered_experts", side_effect=operators.experts.gathered_experts
    )
    model = tiny_model(arch, dtype=dtype).to(device)
    layer = 1 if arch == "deepseek_v3" else 0  # DeepSeek's layer 0 is dense
    original = model.model.layers[layer].mlp.experts
    operator = build(GatheredExperts, original, model, f"model.layers.{layer}.mlp.experts")
    experts = original.gate_up_proj.shape[0]
    hidden = torch.randn(tokens, model.config.hidden_size, dtype=dtype, device=device)
    index = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, 2, device=device).softmax(-1).to(dtype)
    with in_place as spy, prefer_fused_gemv(True):
        actual = operator(hidden, index, weights)
    assert_matches_oracle(actual, original(hidden, index, weights))
    assert spy.call_count == 1


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    },
}


def in_cache(cache_lens: int) -> AttentionContext:
    """An engine context whose cache holds `cache_lens` positions (the table's size)."""
    cache = StaticKVCache({}, num_slots=1, cache_lens=cache_lens)
    empty = torch.zeros(1, dtype=torch.long)
    return AttentionContext(cache=cache, slots=empty, positions=empty[:, None], seq_lens=empty)


@settings(max_examples=25, deadline=None)
@given(
    arch=st.sampled_from(["llama", "qwen2", "qwen3", "deepseek_v3"]),
    rope=st.sampled_from(sorted(ROPES)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    positions=st.lists(st.integers(0, 299), min_size=1, max_size=6),
    rows=st.booleans(),
)
def test_rotary_table_equals_hf_bit_for_bit(arch, rope, dtype, positions, rows) -> None:
    """In an engine context the table gives HF's cos/sin exactly, for a prefill chunk (one row
    of positions) or a decode batch (one position per row), in the activations' dtype."""
    model = tiny_model(arch, rope_parameters=ROPES[rope])
    original = model.model.rotary_emb
    operator = build(RotaryTable, original, model, "model.rotary_emb")
    ids = torch.tensor(positions)
    ids = ids[:, None] if rows else ids[None]
    x = torch.zeros(1, dtype=dtype)
    expected = original(x, ids)
    with use_context(in_cache(300)) as context:
        actual = operator(x, ids)
    assert len(context.cache.derived) == 1
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_rotary_table_is_made_once_per_cache() -> None:
    """Each cache gets its own table (a graph captured with it reads it as long as it lives);
    later calls gather from the same one."""
    model = tiny_model("llama")
    operator = build(RotaryTable, model.model.rotary_emb, model, "model.rotary_emb")
    x, ids = torch.zeros(1), torch.tensor([[3]])
    first, second = in_cache(16), in_cache(32)
    for context in (first, first, second):
        with use_context(context):
            operator(x, ids)
    (small,), (large,) = first.cache.derived.values(), second.cache.derived.values()
    assert small.shape == (16, 2, 16) and large.shape == (32, 2, 16)


@pytest.mark.parametrize(
    "rope",
    [
        None,  # outside an engine context: HF computes
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 32,
        },
    ],
    ids=["no-context", "dynamic", "longrope"],
)
def test_rotary_table_leaves_runtime_ropes_to_hf(rope) -> None:
    """Rope types whose frequencies follow the longest position at run time are computed by the
    HF module at every call, as is everything outside the engine; nothing is tabulated."""
    model = tiny_model("llama", **({"rope_parameters": rope} if rope else {}))
    original = model.model.rotary_emb
    operator = build(RotaryTable, original, model, "model.rotary_emb")
    x, ids = torch.zeros(1), torch.tensor([[5, 40, 70]])
    context = in_cache(128)
    with use_context(context) if rope else contextlib.nullcontext():
        actual = operator(x, ids)
    for got, want in zip(actual, original(x, ids), strict=True):
        assert torch.equal(got, want)
    assert not context.cache.derived
