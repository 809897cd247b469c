"""Tiny random-weight Hugging Face causal LMs for every architecture ktinject supports.

The tests compare ktinject-patched models against *unpatched* Hugging Face models, which act as
the oracle: the same tiny model is built twice from the same seed, one copy is patched, and the
logits / greedy tokens of both are compared. This module only builds the oracle side.

Everything is built from a config alone -- no weights, tokenizers or configs are downloaded and
nothing here touches the Hugging Face Hub, so the helpers work fully offline.

Design choices (all overridable through ``**overrides``):

* Shapes are tiny (hidden 64, 2 layers, 4 query heads / 2 KV heads, head_dim 16, vocab 256) so a
  forward pass plus a 32-token greedy generation runs in well under a second on a laptop CPU.
* ``initializer_range`` is raised from the HF default (0.02) to ``0.2`` (the module constant
  ``INITIALIZER_RANGE``). With 0.02 the residual stream is dominated by the token embedding,
  logits are nearly flat (mean top-1/top-2 margin ~0.05) and greedy decoding often cycles over
  a few tokens. With 0.2 the mean margin is ~0.5 logits and the smallest margin over a 32-token
  greedy run is usually 1e-3..5e-2 (seen as low as 5e-4), i.e. >= 100x the ~3e-6 fp32 logit
  noise between the "sdpa" and "eager" paths, so fp32 round-off in a patched operator should not
  flip a greedy token while a real bug will. Hidden-state RMS stays O(1..4), safe for bf16.
  Margins are a property of random logits, not of scale: compare bf16 runs with tolerances.
* ``eos_token_id`` is ``None`` so ``generate(max_new_tokens=n)`` always produces exactly ``n``
  tokens (no early stop on a random token that happens to be EOS); ``pad_token_id`` is 0.
* Attention defaults to ``"sdpa"``; MoE experts default to the ``"eager"`` experts
  implementation. transformers 5.x would otherwise pick ``"grouped_mm"`` for the fused 3-D expert
  weights whenever it can, even on CPU; the eager per-expert loop is the most literal reference.
* DeepSeek-V3 uses ``first_k_dense_replace=1`` so layer 0 is a dense MLP and layer 1 is MoE.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ATTN_IMPLEMENTATION",
    "DEFAULT_EXPERTS_IMPLEMENTATION",
    "INITIALIZER_RANGE",
    "MOE_ARCHITECTURES",
    "tiny_config",
    "tiny_model",
]

#: ``model_type`` names (transformers 5.17) of every supported architecture.
ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
)

#: The subset of :data:`ARCHITECTURES` that has mixture-of-experts layers.
MOE_ARCHITECTURES: tuple[str, ...] = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3")

#: Std of the normal init used for all linear / embedding / expert / router weights.
INITIALIZER_RANGE: float = 0.2

DEFAULT_ATTN_IMPLEMENTATION: str = "sdpa"
DEFAULT_EXPERTS_IMPLEMENTATION: str = "eager"

_HIDDEN = 64
_HEADS = 4
_KV_HEADS = 2
_HEAD_DIM = 16  # == _HIDDEN // _HEADS, so archs without a head_dim field agree
_INTERMEDIATE = 128
_MOE_INTERMEDIATE = 32
_EXPERTS = 4
_TOP_K = 2

# Fields every architecture's config accepts.
_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": _HIDDEN,
    "intermediate_size": _INTERMEDIATE,
    "num_hidden_layers": 2,
    "num_attention_heads": _HEADS,
    "num_key_value_heads": _KV_HEADS,
    "max_position_embeddings": 512,
    "initializer_range": INITIALIZER_RANGE,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_cache": True,
    "pad_token_id": 0,
    "bos_token_id": None,
    "eos_token_id": None,
    # transformers 5.x: ``rope_theta`` / ``rope_scaling`` were folded into ``rope_parameters``.
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

# Per-architecture additions / overrides of ``_COMMON``.
_ARCH: dict[str, dict[str, Any]] = {
    "llama": {"head_dim": _HEAD_DIM},
    # Qwen2Config has no head_dim field (it is hidden_size // num_attention_heads).
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"head_dim": _HEAD_DIM, "use_sliding_window": False},
    "mixtral": {
        "head_dim": _HEAD_DIM,
        "sliding_window": None,
        # Mixtral's experts use ``intermediate_size``; it has no separate MoE size.
        "intermediate_size": _MOE_INTERMEDIATE * 2,
        "num_local_experts": _EXPERTS,
        "num_experts_per_tok": _TOP_K,
        "router_jitter_noise": 0.0,
    },
    "qwen3_moe": {
        # Qwen3MoeConfig has no head_dim field; attention falls back to hidden // heads == 16.
        "use_sliding_window": False,
        "num_experts": _EXPERTS,
        "num_experts_per_tok": _TOP_K,
        "moe_intermediate_size": _MOE_INTERMEDIATE,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,  # as in the released Qwen3-30B-A3B / 235B-A22B configs
    },
    "olmoe": {
        # OLMoE experts use ``intermediate_size``; the released model has norm_topk_prob False.
        "intermediate_size": _MOE_INTERMEDIATE,
        "num_experts": _EXPERTS,
        "num_experts_per_tok": _TOP_K,
        "norm_topk_prob": False,
        "clip_qkv": None,
    },
    "deepseek_v3": {
        # Multi-head latent attention: K/V are expanded per head from a shared latent, so the
        # number of KV heads must equal the number of query heads (no GQA here).
        "num_key_value_heads": _HEADS,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "rope_interleave": True,
        "intermediate_size": _INTERMEDIATE,  # dense MLP of layer 0
        "moe_intermediate_size": _MOE_INTERMEDIATE,
        "n_routed_experts": _EXPERTS,
        "num_experts_per_tok": _TOP_K,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,  # layer 0 dense MLP, layer 1 MoE
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    },
}


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """Return a tiny config of architecture ``arch`` (a ``model_type`` from :data:`ARCHITECTURES`).

    ``overrides`` are applied on top of the defaults described in the module docstring and may
    contain any field of the architecture's config class (e.g. ``num_hidden_layers=3``,
    ``initializer_range=0.02``). Two special keys are also accepted:

    * ``attn_implementation`` (default ``"sdpa"``), e.g. ``"eager"``;
    * ``experts_implementation`` (default ``"eager"``), e.g. ``"grouped_mm"``; it is ignored by
      models without MoE experts.

    ``rope_theta`` is also accepted and folded into ``rope_parameters`` (transformers 5.x moved it
    there and silently ignores a bare ``rope_theta`` when ``rope_parameters`` is present).

    The config is created with :meth:`AutoConfig.for_model`, i.e. offline.
    """
    if arch not in _ARCH:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    attn_implementation = overrides.pop("attn_implementation", DEFAULT_ATTN_IMPLEMENTATION)
    experts_implementation = overrides.pop("experts_implementation", DEFAULT_EXPERTS_IMPLEMENTATION)
    rope_theta = overrides.pop("rope_theta", None)
    kwargs: dict[str, Any] = {**_COMMON, **_ARCH[arch], **overrides}
    if isinstance(kwargs.get("rope_parameters"), dict):
        kwargs["rope_parameters"] = dict(kwargs["rope_parameters"])  # never share the dict
        if rope_theta is not None:
            # transformers 5.x ignores a bare ``rope_theta`` once ``rope_parameters`` is given.
            kwargs["rope_parameters"]["rope_theta"] = float(rope_theta)
    config = AutoConfig.for_model(arch, **kwargs)
    config._attn_implementation = attn_implementation
    config._experts_implementation = experts_implementation
    return config


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> PreTrainedModel:
    """Build a tiny random-weight ``*ForCausalLM`` of architecture ``arch``, on CPU, in eval mode.

    The weights depend only on ``seed`` and the config: :func:`torch.manual_seed` is called right
    before construction, so two calls with the same arguments return identical models (this is
    what lets a test build one copy to patch with ktinject and one untouched copy as the oracle).
    ``overrides`` are forwarded to :func:`tiny_config`.
    """
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config,
        dtype=dtype,
        attn_implementation=config._attn_implementation,
        experts_implementation=config._experts_implementation,
    )
    return model.to("cpu").eval()
