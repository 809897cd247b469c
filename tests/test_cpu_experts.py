"""MoE experts kept and computed on the CPU (operators.experts.CPUExperts) and the rule file
rules/qwen3-moe-cpu-experts.yaml, against Hugging Face's experts and model.

Block formats (`format: q4_1 / q8_0`) are compared on block-representable weights: weights that
round-trip through the format unchanged, as those of a GGUF file of that format do, so only the
order of the float sums differs from HF (fp32 tolerance 1e-5)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from assertions import assert_matches_oracle
from test_equivalence import PROMPT, engine_greedy, hf_greedy
from tiny_models import tiny_model

from ktinject import optimize
from ktinject.engine import Engine
from ktinject.inject import place
from ktinject.loading import load_weights, plan
from operators import native
from operators.experts import GATHER_ROWS, CPUExperts
from operators.linear import FORMATS, dequantize, quantize_blocks

CPU = torch.device("cpu")


def build(experts: torch.nn.Module, model: torch.nn.Module, **kwargs) -> CPUExperts:
    return CPUExperts.from_module(
        experts, name="model.layers.0.mlp.experts", config=model.config, device=CPU, **kwargs
    )


def routed(model: torch.nn.Module, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Hidden states of `tokens` tokens, each routed to 2 distinct experts with softmax weights."""
    experts = model.config.num_experts if hasattr(model.config, "num_experts") else 4
    hidden = torch.randn(tokens, model.config.hidden_size, dtype=dtype)
    index = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
    return hidden, index, torch.rand(tokens, 2).softmax(-1).to(dtype)


def block_representable(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """Round every expert matrix of `model` through `fmt`, as a GGUF file of it stores them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                flat = param.reshape(-1, param.shape[-1])
                blocks = quantize_blocks(flat, FORMATS[fmt])
                param.copy_(dequantize(*blocks, FORMATS[fmt]).reshape(param.shape))
    return model


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("tokens", [1, 3 * GATHER_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_experts_match_hf(arch: str, tokens: int, dtype: torch.dtype) -> None:
    model = tiny_model(arch, dtype=dtype)
    layer = 1 if arch == "deepseek_v3" else 0  # DeepSeek's layer 0 is dense
    original = model.model.layers[layer].mlp.experts
    operator = build(original, model, threads=1)
    threads = torch.get_num_threads()
    inputs = routed(model, tokens, dtype)
    assert_matches_oracle(operator(*inputs), original(*inputs))
    assert torch.get_num_threads() == threads, "the experts' thread count is restored"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("tokens", [1, 3, 3 * GATHER_ROWS])
def test_block_format_experts_match_hf_on_block_weights(
    fmt: str, tokens: int, with_native: bool
) -> None:
    """1 and 3 tokens: with the C kernel all their experts in two calls, else one compiled
    GEMV kernel per token; 24: per expert, its tokens' rows (C kernel up to 48 rows) or the
    expert's weight dequantized once. Only the blocks are kept, none of the float weights."""
    model = block_representable(tiny_model("qwen3_moe"), fmt)
    original = model.model.layers[0].mlp.experts
    operator = build(original, model, format=fmt)
    assert not list(operator.parameters())
    inputs = routed(model, tokens, torch.float32)
    torch.testing.assert_close(operator(*inputs), original(*inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "cuda:0"}, "places them on cuda:0; set the rule's replace.device to cpu"),
        ({"device": None}, "places them on None"),
        ({"threads": 0}, "threads must be a positive integer or null, not 0"),
        ({"threads": "8"}, "threads must be a positive integer or null, not '8'"),
        ({"format": "q3_k"}, "format 'q3_k' is not one of ['q4_1', 'q8_0'] or null"),
    ],
)
def test_cpu_experts_refuse_bad_kwargs(kwargs: dict, message: str) -> None:
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    device = kwargs.pop("device", CPU)
    with pytest.raises(TypeError, match=re.escape(message)):
        CPUExperts.from_module(experts, name="e", config=model.config, device=device, **kwargs)


def test_block_format_needs_whole_blocks() -> None:
    model = tiny_model("qwen3_moe", moe_intermediate_size=48)
    with pytest.raises(TypeError, match=re.escape("multiples of 32, got 64 and 48")):
        build(model.model.layers[0].mlp.experts, model, format="q8_0")


def test_rule_file_gives_hf_tokens() -> None:
    """rules/qwen3-moe-cpu-experts.yaml: every layer's experts on the CPU, exact tokens; the
    engine says why it neither captures nor compiles that decode step."""
    reference = tiny_model("qwen3_moe")
    patched, report = optimize(copy.deepcopy(reference), "qwen3-moe-cpu-experts", strict=True)
    experts = [r for r in report.replacements if r.name.endswith(".experts")]
    assert len(experts) == reference.config.num_hidden_layers
    assert {(r.operator, r.device) for r in experts} == {(CPUExperts.__name__, "cpu")}
    engine = Engine(patched, compile=True, chunk_size=7)
    assert engine.compiled is None
    assert engine.notes() == [f"--compile has no effect here: {CPUExperts.not_capturable}"]
    assert engine_greedy(engine, PROMPT) == hf_greedy(reference, PROMPT)


def test_rule_file_quantizes_experts_while_loading_a_checkpoint(tmp_path) -> None:
    """`--set format=q4_1`: planned on meta, the checkpoint's expert weights are quantized as
    they load (never held as floats by the operator); tokens equal HF's on Q4_1 weights."""
    reference = block_representable(tiny_model("qwen3_moe"), "q4_1")
    reference.save_pretrained(tmp_path)
    planned = plan(tmp_path, rules="qwen3-moe-cpu-experts", overrides={"format": "q4_1"})
    load_weights(planned.model, tmp_path, torch.float32, progress=False)
    model = place(planned.model, planned.report, CPU).eval()
    experts = model.model.layers[1].mlp.experts
    assert experts.fmt.name == "q4_1" and experts.gate_up_proj_packed.dtype == torch.uint8
    assert engine_greedy(Engine(model), PROMPT) == hf_greedy(reference, PROMPT)


def test_c_kernel_refuses_expert_ids_out_of_range() -> None:
    """The kernel reads weights at the ids it is given: an id past the experts is refused, not
    read from memory beyond them."""
    if native.library() is None:
        pytest.skip("no C compiler here to build operators/native")
    weights = quantize_blocks(torch.randn(3 * 8, 64), FORMATS["q4_1"])
    blocks = tuple(part.view(3, 8, *part.shape[1:]) for part in weights)
    x = torch.randn(2, 64)
    expected = torch.stack([x[0] @ dequantize(*weights, FORMATS["q4_1"])[16:].T])
    torch.testing.assert_close(
        native.block_matmul_experts(x[:1], torch.tensor([2]), *blocks), expected
    )
    with pytest.raises(ValueError, match=r"expert ids in \[0, 3\) \(got \[0, 3\]\)"):
        native.block_matmul_experts(x, torch.tensor([0, 3]), *blocks)
