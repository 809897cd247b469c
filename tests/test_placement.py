"""Modules placed on different devices (ktinject/placement.py): where inputs must move, the hooks
that move them, and the two-device rule file.

This machine has one device, so the plans are checked with a stand-in for "which device is this
module on", and the hooks with moves to the device the tensors are on already; the real
crossings (CUDA and CPU) run in tests/test_gpu.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from assertions import one_sentence
from tiny_models import tiny_model

from ktinject import optimize
from ktinject.cache import AttentionContext, StaticKVCache
from ktinject.engine import Engine, graph_blocker
from ktinject.errors import KtinjectError
from ktinject.loading import rules_for
from ktinject.placement import InputsFollow, Move, align_devices, plan_moves
from ktinject.sampling import SamplingParams

CPU, OTHER = torch.device("cpu"), torch.device("cuda:1")
BLOCKS = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm"]
BLOCKS += ["model.rotary_emb", "lm_head"]


def placed(model: torch.nn.Module, *names: str):
    """A stand-in device lookup: the named modules and everything inside them on OTHER."""
    inside = {id(m) for name in names for m in model.get_submodule(name).modules()}
    return lambda module: OTHER if id(module) in inside else CPU


def greedy(engine: Engine, prompt: list[int], n: int = 8) -> list[int]:
    generation = engine.generate(prompt, SamplingParams(max_new_tokens=n))
    generation.result()
    return generation.token_ids


def test_a_model_on_one_device_needs_no_moves() -> None:
    model, _ = optimize(tiny_model("llama"), rules_for("llama"))
    assert plan_moves(model) == []
    assert align_devices(model) == []
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())


def test_layers_split_over_two_devices_cross_once() -> None:
    """Blocks take inputs onto their device and leave outputs there; nothing inside a layer on
    one device moves again."""
    model, _ = optimize(tiny_model("llama"), rules_for("llama"))
    moves = plan_moves(model, placed(model, "model.layers.1", "model.norm", "lm_head"))
    on_other = {"model.layers.1", "model.norm", "lm_head"}
    assert sorted(moves, key=lambda m: m.name) == sorted(
        (Move(name, OTHER if name in on_other else CPU, returns=False) for name in BLOCKS),
        key=lambda m: m.name,
    )


def test_layer_lists_get_no_hook_of_their_own() -> None:
    """A layer list has no forward: with its first layer elsewhere, only the layer moves."""
    model, _ = optimize(tiny_model("llama"), rules_for("llama"))
    moves = plan_moves(model, placed(model, "model.layers.0"))
    assert "model.layers" not in {m.name for m in moves}
    assert Move("model.layers.0", OTHER, returns=False) in moves


def test_a_module_on_another_device_than_its_parent_gives_its_output_back() -> None:
    model, _ = optimize(tiny_model("llama"), rules_for("llama"))
    moves = plan_moves(model, placed(model, "model.layers.0.input_layernorm"))
    assert Move("model.layers.0.input_layernorm", OTHER, returns=True) in moves
    assert {m.name for m in moves if not m.returns} == set(BLOCKS)


def test_operators_that_place_their_own_inputs_get_no_hook() -> None:
    """CPUExperts copies the hidden states over and back itself (one stream sync)."""
    model, _ = optimize(tiny_model("qwen3_moe"), rules_for("qwen3-moe-cpu-experts"))
    experts = [n for n, m in model.named_modules() if type(m).__name__ == "CPUExperts"]
    moves = plan_moves(model, placed(model, *experts))
    assert moves and not {m.name for m in moves} & set(experts)


def test_hooks_move_inputs_and_are_replaced_not_stacked(monkeypatch) -> None:
    """accelerate's hooks around our operators (moves to the device the tensors are on: this
    machine has one), installed again after a change of placement instead of on top."""
    reference = tiny_model("llama")
    expected = reference.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=8, do_sample=False)
    model, _ = optimize(copy.deepcopy(reference), rules_for("llama"))
    plan = [Move("model.layers.1", CPU, False), Move("model.layers.0.mlp", CPU, True)]
    monkeypatch.setattr("ktinject.placement.plan_moves", lambda model: plan)
    for _ in range(2):
        assert align_devices(model) == plan
    hooked = {
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "_hf_hook", None), InputsFollow)
    }
    assert hooked == {"model.layers.1", "model.layers.0.mlp"}
    assert not hasattr(model.model.layers[1]._hf_hook, "hooks")  # one hook, not a sequence
    assert greedy(Engine(model), [1, 5, 9]) == expected[0, 3:].tolist()


def test_the_two_device_rule_file_gives_hf_tokens() -> None:
    reference = tiny_model("llama")
    expected = reference.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=8, do_sample=False)
    model, report = optimize(
        copy.deepcopy(reference), "llama-2gpu", strict=True, gpu1="cpu", second="1"
    )
    pinned = {r.name for r in report.replacements if r.pinned}
    assert pinned == {"model.layers.1", "model.norm", "lm_head"}
    assert greedy(Engine(model), [1, 5, 9]) == expected[0, 3:].tolist()


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="this machine has a second GPU")
def test_the_two_device_rule_file_names_the_flag_for_a_missing_gpu() -> None:
    with pytest.raises(KtinjectError) as caught:
        optimize(tiny_model("llama"), "llama-2gpu")
    one_sentence(caught.value, "'cuda:1'", "--set gpu1=")


def test_attention_context_copies_its_tensors_once_per_device() -> None:
    cache = StaticKVCache({}, num_slots=1, cache_lens=4)
    context = AttentionContext(
        cache=cache,
        slots=torch.tensor([0]),
        positions=torch.tensor([[2]]),
        seq_lens=torch.tensor([3]),
        host_rows=[(0, 2)],
    )
    assert context.on(CPU) is context
    meta = context.on(torch.device("meta"))
    assert meta is context.on(torch.device("meta"))
    assert {t.device.type for t in (meta.slots, meta.positions, meta.seq_lens)} == {"meta"}
    assert meta.cache is cache and meta.host_rows == [(0, 2)]


def test_a_model_spread_over_devices_decodes_without_graphs() -> None:
    model, _ = optimize(tiny_model("llama"), rules_for("llama"))
    model.model.norm.register_buffer("elsewhere", torch.empty(1, device="meta"))
    reason = graph_blocker(model)
    assert reason is not None and "cpu, meta" in reason
