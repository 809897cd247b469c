"""GPU-only: the engine with CUDA-graph decode and the Triton kernels against unpatched HF.

Token-exact comparisons run in fp32 with TF32 off; bf16 compares logits within 2e-2 relative to
the logit scale. These tests skip (visibly) on machines without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model

from ktinject import optimize
from ktinject.completion import Completion, sample_rows
from ktinject.devices import host_ints_to
from ktinject.engine import Engine
from ktinject.loading import rules_for
from ktinject.sampling import SamplingParams
from operators.experts import CPUExperts

pytestmark = pytest.mark.gpu

PROMPT = [1, 5, 9, 13, 17, 3, 7, 11, 19, 23, 29]


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def models(arch: str, dtype: torch.dtype = torch.float32):
    reference = tiny_model(arch, dtype=dtype).cuda()
    patched, _ = optimize(copy.deepcopy(reference), rules_for(arch), strict=True)
    return reference, patched


def greedy(engine: Engine, prompt: list[int], n: int = 32) -> list[int]:
    generation = engine.generate(prompt, SamplingParams(max_new_tokens=n))
    generation.result()
    return generation.token_ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_greedy_tokens_equal_hf_with_and_without_cuda_graph(arch: str, cuda_graph: bool) -> None:
    reference, patched = models(arch)
    out = reference.generate(
        torch.tensor([PROMPT], device="cuda"), max_new_tokens=32, do_sample=False
    )
    expected = out[0, len(PROMPT) :].tolist()
    engine = Engine(patched, cuda_graph=cuda_graph, chunk_size=7)
    assert engine.cuda_graph == cuda_graph  # MoE too: the shipped rules use GatheredExperts
    assert greedy(engine, PROMPT) == expected


def test_cpu_experts_of_a_gpu_model_give_hf_tokens() -> None:
    """rules/qwen3-moe-cpu-experts.yaml on a GPU: attention and router on the GPU, experts in
    CPU memory; decode is eager (no graph) and exact."""
    reference = tiny_model("qwen3_moe").cuda()
    patched, _ = optimize(copy.deepcopy(reference), "qwen3-moe-cpu-experts", strict=True)
    layer = patched.model.layers[0]
    assert layer.mlp.experts.gate_up_proj.device.type == "cpu"
    assert layer.mlp.gate.weight.is_cuda and layer.self_attn.o_proj.weight.is_cuda
    out = reference.generate(
        torch.tensor([PROMPT], device="cuda"), max_new_tokens=24, do_sample=False
    )
    engine = Engine(patched, chunk_size=7)
    assert not engine.cuda_graph
    assert engine.notes() == [f"decode runs without CUDA graphs: {CPUExperts.not_capturable}"]
    assert greedy(engine, PROMPT, 24) == out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-gemv"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral", "deepseek_v3"])
def test_both_captured_decode_paths_give_hf_tokens(arch: str, fused: bool) -> None:
    """The engine keeps whichever graph replays faster; both must be exact (fp32, TF32 off)."""
    reference, patched = models(arch)
    out = reference.generate(
        torch.tensor([PROMPT], device="cuda"), max_new_tokens=24, do_sample=False
    )
    engine = Engine(patched)
    engine.fused_gemv_choice[1] = fused  # skip the timing: capture this path only
    assert greedy(engine, PROMPT, 24) == out[0, len(PROMPT) :].tolist()
    assert engine.fused_gemv_choice == {1: fused}


@pytest.mark.parametrize(
    ("arch", "rows"),
    [("llama", 3), ("qwen3", 3), ("mixtral", 3), ("deepseek_v3", 3), ("qwen3_moe", 10)],
)
def test_batched_graph_decode_equals_single_sequences(arch: str, rows: int) -> None:
    """10 rows: more than the experts gather outside a capture (GATHER_ROWS), as a server with
    --max-batch-size 10 captures them."""
    _, patched = models(arch)
    prompts = [PROMPT, [2, 4, 6, 8], [3, 1, 4, 1, 5, 9, 2, 6]]
    prompts += [[row + 1, 2 * row + 3, 7] for row in range(rows - 3)]
    expected = [greedy(Engine(patched, cuda_graph=False), p, 12) for p in prompts]
    engine = Engine(patched, cache_lens=64, num_slots=rows)
    tokens = [[int(engine.prefill(slot, p)[0].argmax())] for slot, p in enumerate(prompts)]
    for _ in range(11):
        step = engine.decode(list(range(rows)), [t[-1] for t in tokens])
        for row in range(rows):
            tokens[row].append(int(step[row].argmax()))
    assert tokens == expected
    assert rows in engine.graphs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_short_prefill_chunks_replayed_as_rows_give_hf_logits(arch: str) -> None:
    """Chunks of up to 128 tokens replay a plain decode graph with one row per token
    (`Engine._prefill_rows`), padded to 16/32/64/128 rows; longer ones prefill eagerly."""
    reference, patched = models(arch)
    tokens = [i % 50 + 1 for i in range(345)]
    with torch.inference_mode():
        expected = reference(torch.tensor([tokens], device="cuda")).logits[0]
    engine = Engine(patched, cache_lens=512)
    end = 140
    engine.prefill(0, tokens[:end])
    assert not engine.prefill_graphs  # longer than any replayed chunk
    for length in (5, 16, 20, 64, 100):
        end += length
        logits, cached = engine.prefill(0, tokens[:end])
        assert cached == end - length
        torch.testing.assert_close(logits, expected[end - 1], atol=1e-4, rtol=1e-4)
    assert sorted(engine.prefill_graphs) == [16, 32, 64, 128]


def test_sampling_a_mixed_batch_never_synchronises() -> None:
    """The server samples each step while the next one runs (`decode_sampled`); a plain
    host-to-GPU copy or a host read would wait for it. Greedy, top-p, top-k and seeded rows,
    and the row indices the scheduler copies when requests join or leave."""
    cuda = torch.device("cuda")
    settings = [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=1.2, top_k=5, seed=4),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(),
    ]
    rows = [Completion(p, tokenizer=None, eos_ids=set(), device=cuda) for p in settings]
    logits = torch.randn(len(rows), 3000, device=cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample_rows(rows, logits)
        host_ints_to([3, 1, 4], cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens[0] == logits[0].argmax() and tokens[4] == logits[4].argmax()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-gemv"])
def test_bf16_graph_logits_within_tolerance(fused: bool) -> None:
    reference, patched = models("llama", torch.bfloat16)
    tokens = PROMPT + [31, 37, 41, 43]
    with torch.inference_mode():
        expected = reference(torch.tensor([tokens], device="cuda")).logits[0].float()
    engine = Engine(patched, cache_lens=64)
    engine.fused_gemv_choice[1] = fused
    engine.prefill(0, PROMPT)
    for index in range(len(PROMPT), len(tokens)):
        step = engine.decode([0], [tokens[index]])[0].float()
        scale = expected[index].abs().max()
        assert (step - expected[index]).abs().max() <= 2e-2 * scale


def test_layers_split_between_the_gpu_and_the_cpu_give_hf_tokens() -> None:
    """rules/llama-2gpu.yaml with its second part in CPU memory: the hidden state crosses to
    the CPU and the logits come back (ktinject/placement.py); decode runs without graphs."""
    reference, _ = models("llama")
    out = reference.generate(
        torch.tensor([PROMPT], device="cuda"), max_new_tokens=16, do_sample=False
    )
    patched, _ = optimize(
        copy.deepcopy(reference), "llama-2gpu", strict=True, gpu1="cpu", second="1"
    )
    assert patched.model.layers[1].self_attn.qkv.weight.device.type == "cpu"
    engine = Engine(patched)
    assert not engine.cuda_graph and "cpu, cuda:0" in engine.graph_blocked_by
    assert greedy(engine, PROMPT, 16) == out[0, len(PROMPT) :].tolist()


def test_norms_on_the_cpu_inside_gpu_layers_give_hf_tokens() -> None:
    """The README's rule-file example with --set norm_device=cpu: each norm takes its input to
    the CPU and gives its output back to the layer on the GPU."""
    reference, _ = models("llama")
    out = reference.generate(
        torch.tensor([PROMPT], device="cuda"), max_new_tokens=16, do_sample=False
    )
    rules = {
        "extends": "llama.yaml",
        "rules": [
            {
                "match": {"class": "LlamaRMSNorm"},
                "replace": {"class": "operators.norm.RMSNorm", "device": "cpu"},
            }
        ],
    }
    patched, _ = optimize(copy.deepcopy(reference), rules, strict=True)
    assert patched.model.layers[0].input_layernorm.weight.device.type == "cpu"
    assert greedy(Engine(patched), PROMPT, 16) == out[0, len(PROMPT) :].tolist()


def test_graph_capture_during_a_generation_is_kept_out_of_its_rates() -> None:
    """`ktinject run` does not warm up on a GPU: its first decode step captures the graphs,
    which the status line reports apart from the decode rate (GenerationStats.setup_s)."""
    _, patched = models("llama")
    engine = Engine(patched)
    generation = engine.generate(PROMPT, SamplingParams(max_new_tokens=8))
    generation.result()
    stats = generation.stats
    assert engine.capture_s > 0
    assert stats.setup_s == pytest.approx(engine.capture_s)
    assert stats.decode_s > 0
