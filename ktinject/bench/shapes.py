"""Named random-weight model shapes, built from a config alone (nothing is downloaded).

Speed depends on a model's shapes, not on its weights, so `ktinject bench --shape llama3-8b` can
measure an 8B model on a machine that has never seen its checkpoint. The architecture is built on
the meta device and each parameter is then created directly on the target device, in the target
dtype, and filled with a seeded normal: an 8B model in bf16 never exists in fp32 anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ktinject.errors import KtinjectError


@dataclass(frozen=True)
class Shape:
    """A published model's architecture. `init_std` is the std of the random weights: 0.02 (the
    usual initializer range) for real shapes; `tiny` uses 0.2 so greedy tokens have clear margins
    (see tests/tiny_models.py)."""

    model_type: str
    config: dict[str, Any]
    init_std: float = 0.02
    note: str = ""


SHAPES: dict[str, Shape] = {
    "smollm2-135m": Shape(
        "llama",
        {
            "hidden_size": 576,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "intermediate_size": 1536,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        },
        note="SmolLM2-135M",
    ),
    "llama3-8b": Shape(
        "llama",
        {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 14336,
            "vocab_size": 128256,
            "tie_word_embeddings": False,
            # Llama-3.1's window, so decode past 8k positions is allowed; RoPE scaling is left out
            # (it changes no shape and no cost)
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        },
        note="Llama-3-8B / 3.1-8B",
    ),
    "qwen3-30b-a3b": Shape(
        "qwen3_moe",
        {
            "hidden_size": 2048,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "vocab_size": 151936,
            "tie_word_embeddings": False,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        note="Qwen3-30B-A3B",
    ),
    # for smoke tests: the whole bench runs in seconds
    "tiny": Shape(
        "llama",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 128,
            "vocab_size": 256,
            "tie_word_embeddings": False,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        init_std=0.2,
        note="smoke tests",
    ),
}


def shape_config(name: str) -> Any:
    """The Hugging Face config of shape `name`, or one sentence listing the known shapes."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise KtinjectError(f"--shape {name!r} is unknown; use one of {', '.join(SHAPES)}.")
    shape = SHAPES[name]
    # no eos: random weights must not stop early, and HF's min_new_tokens then has nothing to mask
    config = AutoConfig.for_model(
        shape.model_type, bos_token_id=None, eos_token_id=None, pad_token_id=0, **shape.config
    )
    config._attn_implementation = "sdpa"
    return config


def random_model(name: str, device: torch.device, dtype: torch.dtype, *, seed: int) -> nn.Module:
    """Shape `name` with seeded random weights created on `device` in `dtype`, in eval mode."""
    from ktinject.loading import build_on_meta

    config = shape_config(name)
    model = build_on_meta(config, dtype)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    materialize(model, device, dtype, SHAPES[name].init_std, generator)
    model.tie_weights()  # tied embeddings (SmolLM2) were separate parameters on meta
    return model.eval()


def materialize(
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    std: float,
    generator: torch.Generator,
) -> None:
    """Replace each meta parameter by a random one on `device` (norm weights 1, biases 0), keep
    tied parameters tied, and move buffers (RoPE tables) along."""
    made: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                made[id(param)] = nn.Parameter(
                    _random(f"{module_name}.{key}", param.shape, device, dtype, std, generator),
                    requires_grad=False,
                )
            module._parameters[key] = made[id(param)]
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[key] = buffer.to(device)


def _random(
    name: str,
    shape: torch.Size,
    device: torch.device,
    dtype: torch.dtype,
    std: float,
    generator: torch.Generator,
) -> torch.Tensor:
    tensor = torch.empty(shape, device=device, dtype=dtype)
    if name.endswith("bias"):
        return tensor.zero_()
    if tensor.dim() == 1:  # RMSNorm weights
        return tensor.fill_(1.0)
    return tensor.normal_(0.0, std, generator=generator)
