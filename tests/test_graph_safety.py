"""The decode step a CUDA graph captures, run on CPU with every GPU code path forced on.

With `use_triton` forced to True (the Triton kernels run under the interpreter here), a
`DecodeStep` reads token ids, positions, slots and lengths from static buffers and must
1. make no host synchronisation (anything that reads a device value on the host would fail during
   CUDA-graph capture), and
2. give the logits and K/V writes of the engine's CPU path (the torch references), with the
   decode step's plain kernels and with the fused projections (operators/triton/gemv.py).
This catches on a CPU machine what would otherwise only fail on a GPU.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from tiny_models import MOE_ARCHITECTURES, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import ktinject.engine
import operators.attention
import operators.experts
import operators.layer
import operators.mlp
import operators.native.ops
import operators.norm
from ktinject import optimize
from ktinject.engine import DecodeStep, Engine, graph_blocker
from ktinject.loading import rules_for
from ktinject.sampling import SamplingParams
from operators.experts import GatheredExperts
from operators.layer import FusedResidualDecoderLayer
from operators.mlp import FusedGatedMLP
from operators.triton.gemv import prefer_fused_gemv

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="simulates the GPU path on CPU; on a GPU tests/test_gpu.py runs the real one",
)

HOST_SYNCS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.item.default,
}


class NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host (`.item()`, `bool(t)`, `int(t)`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            raise AssertionError(f"host synchronisation inside the decode step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpu_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    force_gpu_paths(monkeypatch)


def force_gpu_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (
        operators.attention,
        operators.experts,
        operators.layer,
        operators.mlp,
        operators.norm,
    ):
        monkeypatch.setattr(module, "use_triton", lambda tensor: True)
    monkeypatch.setattr(operators.experts, "graph_safe", lambda tensor: True)
    # the CPU's C++ layer operators never serve a GPU step (its tensors are not on a CPU)
    monkeypatch.setattr(operators.native.ops, "layer_ops_serve", lambda *tensors: False)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-gemv"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", *MOE_ARCHITECTURES])
def test_graph_step_is_sync_free_and_matches_eager_decode(
    arch: str, fused: bool, gpu_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shipped rule file, MoE ones included (their experts are GatheredExperts; HF's own
    experts the engine never captures, below); `fused`: the step the engine captures second,
    with norms, SiLU and residual adds inside the projections (operators/triton/gemv.py) and
    the experts' weights read in place (operators/triton/experts.py)."""
    model, _ = optimize(tiny_model(arch), rules_for(arch), strict=True)
    # 160 positions: decode attention runs 3 splits of 64 (slot 0 fills two of them), merged by
    # the last split to finish (the cache's split counters)
    prompts = {0: [i % 50 + 1 for i in range(79)], 1: [2, 4, 6]}
    engine = Engine(model, cache_lens=160, num_slots=2)
    for slot, prompt in prompts.items():
        engine.prefill(slot, prompt)
    eager = copy.deepcopy(engine.cache)
    slots, tokens = [1, 0], [7, 3]
    positions = [len(prompts[s]) for s in slots]
    folded = {"norm_linear": 0, "silu_linear": 0, "gathered_experts": 0}
    for name in folded:
        module = operators.experts if name == "gathered_experts" else operators.layer
        monkeypatch.setattr(module, name, counted(getattr(module, name), folded, name))

    step = DecodeStep(engine, batch=2)
    step.load(slots, tokens, positions)
    with NoHostSync(), prefer_fused_gemv(fused):
        logits = step()
    layers = [m for m in model.modules() if isinstance(m, FusedResidualDecoderLayer)]
    attention = sum(hasattr(layer.self_attn, "attend") for layer in layers)  # not MLA
    dense = sum(isinstance(layer.mlp, FusedGatedMLP) for layer in layers)  # not MoE
    moe = sum(isinstance(m, GatheredExperts) for m in model.modules())  # experts read in place
    assert attention + dense > 0
    expected = {"norm_linear": attention + dense, "silu_linear": dense, "gathered_experts": moe}
    assert folded == (expected if fused else dict.fromkeys(folded, 0))

    assert not any(c.any() for c in engine.cache.split_counters.values())
    monkeypatch.undo()  # the CPU path (torch references) is the oracle
    engine.cache = eager
    expected = engine.decode(slots, tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    for layer, (k_cache, v_cache) in engine.cache.kv.items():  # the step's K/V writes too
        written = (k_cache[slots, :, positions], v_cache[slots, :, positions])
        step_k, step_v = step.context.cache.kv[layer]
        torch.testing.assert_close(step_k[slots, :, positions], written[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_v[slots, :, positions], written[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-gemv"])
def test_capture_of_more_rows_than_gathered_decode_takes_is_sync_free(
    fused: bool, gpu_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server captures a decode step per batch size up to --max-batch-size. Past
    GATHER_ROWS rows an eager GPU step groups tokens by expert on the host; inside a capture the
    experts must still be gathered on the device (a host read there fails the capture)."""
    monkeypatch.setattr(operators.experts, "host_reads_forbidden", lambda tensor: True)
    model, _ = optimize(tiny_model("qwen3_moe"), rules_for("qwen3_moe"), strict=True)
    rows = operators.experts.GATHER_ROWS + 2
    engine = Engine(model, cache_lens=16, num_slots=rows)
    for slot in range(rows):
        engine.prefill(slot, [slot + 1, 2, 3])
    eager = copy.deepcopy(engine.cache)
    step = DecodeStep(engine, batch=rows)
    step.load(list(range(rows)), [5] * rows, [3] * rows)
    # the grouped loop's `tolist()` of a CPU tensor bypasses the dispatcher NoHostSync watches
    grouped = AssertionError("the experts read the routing on the host")
    monkeypatch.setattr(GatheredExperts, "_grouped", mock.Mock(side_effect=grouped))
    with NoHostSync(), prefer_fused_gemv(fused):
        logits = step()
    monkeypatch.undo()
    engine.cache = eager
    expected = engine.decode(list(range(rows)), [5] * rows)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def counted(function, counts: dict[str, int], name: str):
    def call(*args, **kwargs):
        counts[name] += 1
        return function(*args, **kwargs)

    return call


def test_step_takes_ids_sampled_on_the_device_like_host_ids() -> None:
    """`Engine.decode_sampled` hands the step a device tensor: it lands in the same input buffer
    as host ids do (copied on the device, never read on the host)."""
    model, _ = optimize(tiny_model("llama"), rules_for("llama"), strict=True)
    engine = Engine(model, cache_lens=32, num_slots=2)
    step = DecodeStep(engine, batch=2)
    step.load([1, 0], [7, 3], [5, 3])
    from_host = step.inputs.clone()
    step.load([1, 0], torch.tensor([7, 3]), [5, 3])
    assert torch.equal(step.inputs, from_host)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_engine_does_not_capture_hf_experts(arch: str) -> None:
    """HF's eager experts loop reads routing on the host; its grouped_mm builds offsets from a CPU
    tensor, which CUDA-graph capture refuses (seen on an H200)."""
    assert graph_blocker(tiny_model(arch)) is not None
    assert graph_blocker(tiny_model(arch, experts_implementation="grouped_mm")) is not None


def test_dense_models_are_captured() -> None:
    assert graph_blocker(tiny_model("llama")) is None


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_moe_models_with_shipped_rules_are_captured(arch: str) -> None:
    model, _ = optimize(tiny_model(arch), rules_for(arch), strict=True)
    assert graph_blocker(model) is None


class EagerGraph:
    """Stands in for `_DecodeGraph` on CPU: the step it would capture, run eagerly and checked
    sync-free at every replay."""

    def __init__(self, engine: Engine, batch: int, *, fused: bool) -> None:
        self.step, self.fused, self.logits = DecodeStep(engine, batch), fused, None
        self.graph = SimpleNamespace(replay=self.replay)

    def replay(self) -> None:
        with NoHostSync(), prefer_fused_gemv(self.fused):
            self.logits = self.step()

    def run(self, slots, token_ids, positions) -> torch.Tensor:
        self.step.load(slots, token_ids, positions)
        self.replay()
        return self.logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_short_prefill_chunk_replays_a_decode_graph_with_a_row_per_token(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU a short prefill chunk replays the plain decode graph with one row per token, all
    rows in one slot (`Engine._prefill_rows`), instead of an eager forward that costs ~35 ms of
    host work there. With the graphs stood in by their eager steps (and, to keep the Triton
    interpreter quick, graphs of 4 and 8 rows): a history prefilled eagerly (longer than any
    such graph), a follow-up of 3 tokens replayed as 4 rows (one of them padding), then decode,
    give the logits, cache and greedy tokens of the CPU path."""
    model, _ = optimize(tiny_model(arch), rules_for(arch), strict=True)
    history = [i % 50 + 1 for i in range(12)]
    prompt = [*history, 3, 9, 27]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    reference = Engine(model, cache_lens=64)
    expected_logits, _ = reference.prefill(0, prompt)
    expected_cache = copy.deepcopy(reference.cache)
    expected = reference.generate(prompt, params)
    expected.result()

    force_gpu_paths(monkeypatch)
    monkeypatch.setattr(ktinject.engine, "_DecodeGraph", EagerGraph)
    monkeypatch.setattr(ktinject.engine, "PREFILL_GRAPH_ROWS", (4, 8))
    monkeypatch.setattr(ktinject.engine, "fused_gemv_pinned", lambda: False)  # no replay timing
    engine = Engine(model)  # local mode: the cache is sized (for 8-row steps) on first use
    engine.cuda_graph, engine.graph_pool = True, "pool"
    engine.prefill(0, history)
    assert not engine.prefill_graphs  # 12 tokens: eager
    logits, cached = engine.prefill(0, prompt)
    assert cached == len(history) and list(engine.prefill_graphs) == [4]
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    end = len(prompt)
    for layer, (k_cache, v_cache) in engine.cache.kv.items():
        want_k, want_v = expected_cache.kv[layer]
        torch.testing.assert_close(k_cache[0, :, :end], want_k[0, :, :end], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_cache[0, :, :end], want_v[0, :, :end], atol=1e-5, rtol=1e-5)
    generation = engine.generate(prompt, params, reuse=True)
    generation.result()
    assert generation.token_ids == expected.token_ids
    assert engine.graphs  # decode replayed (stood-in) graphs too


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_moe_prefill_never_replays_decode_graphs(arch: str) -> None:
    """Gathered experts copy each row's experts' weights: a 128-row step of Qwen3-30B-A3B would
    copy gigabytes, so MoE models prefill eagerly."""
    model, _ = optimize(tiny_model(arch), rules_for(arch), strict=True)
    engine = Engine(model, cache_lens=64)
    engine.cuda_graph = True
    assert not engine.prefill_graphs_allowed
    assert engine._prefill_rows(0, 5) is None
