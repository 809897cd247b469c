"""Injection: which modules a rule set replaces, with what, where they end up, and the report.

Models are the tiny random-weight Llamas of tests/tiny_models.py (two decoder layers); the
unpatched Hugging Face model is the oracle for the end-to-end checks (identical greedy tokens).
"""

from __future__ import annotations

import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from assertions import one_sentence
from external_operators import ScaleBy, Wrapped
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_config, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ktinject.errors import DeviceError, RuleError, UnmatchedRuleError
from ktinject.inject import (
    InjectionReport,
    Replacement,
    UnmatchedRuleWarning,
    optimize,
    place,
)
from ktinject.rules import builtin_rules_dir, load_rules
from operators.mlp import FusedGatedMLP
from operators.norm import RMSNorm

LLAMA_RULES = builtin_rules_dir() / "llama.yaml"
MISSING_CUDA = f"cuda:{torch.cuda.device_count() + 3}"
LAYERS = ("model.layers.0", "model.layers.1")
MLPS = [f"{layer}.mlp" for layer in LAYERS]
NORMS = [
    *(
        f"{layer}.{norm}"
        for layer in LAYERS
        for norm in ("input_layernorm", "post_attention_layernorm")
    ),
    "model.norm",
]


class MyRMSNorm(LlamaRMSNorm):
    """A user subclass of a Hugging Face class: rules naming the base must still match it."""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def rule(name: str | None = None, cls: str = "default", *, of: str | None = None, **rest) -> dict:
    """An in-memory rule on `name` (and class `of`); `recursive` or replace keys in `rest`."""
    recursive = rest.pop("recursive", None)
    body = {"match": {"name": name, "class": of}, "replace": {"class": cls, **rest}}
    body["match"] = {k: v for k, v in body["match"].items() if v is not None}
    if recursive is not None:
        body["recursive"] = recursive
    return body


def names(report: InjectionReport) -> list[str]:
    return [r.name for r in report.replacements]


def greedy(model: nn.Module, new_tokens: int = 32) -> torch.Tensor:
    prompt = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new_tokens,
        )


@pytest.fixture
def llama() -> nn.Module:
    return tiny_model("llama")


# --- which rule applies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        ("operators.mlp.FusedGatedMLP", "torch.nn.Identity", FusedGatedMLP),
        ("torch.nn.Identity", "operators.mlp.FusedGatedMLP", nn.Identity),
    ],
)
def test_the_first_matching_rule_wins(llama: nn.Module, first: str, second: str, winner) -> None:
    rules = [rule(r"mlp$", first, recursive=False), rule(r"layers\.\d+\.mlp$", second)]

    model, report = optimize(llama, rules)

    assert all(type(model.get_submodule(name)) is winner for name in MLPS)
    assert {r.rule for r in report.replacements} == {"<rules> #0"}


def test_a_rule_shadowed_by_an_earlier_one_is_not_unmatched(llama: nn.Module) -> None:
    """The usual `extends` override: our rule hides the base's rule for the same modules. The
    base rule did match, so it is not reported (and `strict` does not fail)."""
    rules = {"extends": "llama", "rules": [rule(of="LlamaRMSNorm")]}

    _, report = optimize(llama, rules, strict=True)

    assert report.unmatched == []
    assert all(type(llama.get_submodule(name)) is LlamaRMSNorm for name in NORMS)


def test_modules_no_rule_matches_stay_as_they_were(llama: nn.Module) -> None:
    embed, head = llama.model.embed_tokens, llama.lm_head

    optimize(llama, LLAMA_RULES)

    assert llama.model.embed_tokens is embed and llama.lm_head is head


def test_no_rules_change_nothing(llama: nn.Module) -> None:
    before = {name: type(m) for name, m in llama.named_modules()}

    model, report = optimize(llama, None)

    assert model is llama
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert report.replacements == [] and report.unmatched == []


# --- recursive ----------------------------------------------------------------------------------


def test_recursive_false_does_not_look_inside_the_replaced_module(llama: nn.Module) -> None:
    rules = [
        rule(r"mlp$", "operators.mlp.FusedGatedMLP", recursive=False),
        rule(r"mlp\.down_proj$", device="cpu"),
    ]

    with pytest.warns(UnmatchedRuleWarning, match=re.escape("<rules> rule 1")):
        _, report = optimize(llama, rules)

    assert names(report) == MLPS
    assert report.unmatched == ["<rules> rule 1"]


def test_recursive_true_descends_into_the_new_modules_children(llama: nn.Module) -> None:
    """The new FusedGatedMLP has `down_proj` but no `gate_proj` (fused away): only the children
    of the *new* module are visited."""
    rules = [
        rule(r"mlp$", "operators.mlp.FusedGatedMLP"),
        rule(r"mlp\.(gate|down)_proj$", device="cpu"),
    ]

    _, report = optimize(llama, rules)

    assert names(report) == [name for mlp in MLPS for name in (mlp, f"{mlp}.down_proj")]


def test_an_operator_keeping_its_original_as_a_child_is_not_wrapped_again(
    llama: nn.Module,
) -> None:
    rules = [rule(r"mlp$", "external_operators.Wrapped")]

    model, report = optimize(llama, rules, allow_external_operators=True)

    assert names(report) == MLPS
    assert not isinstance(model.model.layers[0].mlp.inner, Wrapped)


def test_recursive_is_true_by_default(llama: nn.Module) -> None:
    _, report = optimize(llama, [rule(r"^model$"), rule(r"^model\.norm$")])

    assert names(report) == ["model", "model.norm"]


# --- class filters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wanted",
    ["LlamaRMSNorm", "transformers.models.llama.modeling_llama.LlamaRMSNorm"],
    ids=["short", "dotted"],
)
def test_a_class_filter_matches_by_short_or_dotted_name(llama: nn.Module, wanted: str) -> None:
    _, report = optimize(llama, [rule(of=wanted, cls="operators.norm.RMSNorm")])

    assert names(report) == NORMS
    assert all(type(llama.get_submodule(name)) is RMSNorm for name in NORMS)


def test_a_class_filter_matches_subclasses(llama: nn.Module) -> None:
    llama.model.norm = MyRMSNorm(llama.config.hidden_size)

    _, report = optimize(llama, [rule(r"^model\.norm$", of="LlamaRMSNorm")])

    assert [(r.name, r.original) for r in report.replacements] == [("model.norm", "MyRMSNorm")]


def test_a_class_filter_and_a_name_must_both_match(llama: nn.Module) -> None:
    with pytest.warns(UnmatchedRuleWarning):
        _, report = optimize(llama, [rule(r"mlp$", of="LlamaRMSNorm")])

    assert report.replacements == []


# --- replace.class: default, devices ------------------------------------------------------------


def test_default_keeps_the_module_and_pins_it_to_its_device(llama: nn.Module) -> None:
    norm = llama.model.norm

    _, report = optimize(llama, [rule(r"^model\.norm$", "default", device="cpu")])

    assert llama.model.norm is norm
    assert norm.weight.device == torch.device("cpu")
    assert report.replacements == [
        Replacement(
            name="model.norm",
            rule="<rules> #0",
            original="LlamaRMSNorm",
            operator="default",
            device="cpu",
            pinned=True,
        )
    ]


def test_a_rule_without_device_leaves_the_module_where_it_was(llama: nn.Module) -> None:
    _, report = optimize(llama, [rule(r"^model\.norm$", "operators.norm.RMSNorm")])

    (row,) = report.replacements
    assert (row.device, row.pinned) == ("cpu", False)


def test_place_moves_pinned_modules_to_their_device_and_the_rest_to_the_default() -> None:
    """On a CPU-only machine the meta device stands in for "another device": everything not
    pinned goes to the default (meta), what a rule pinned goes to its device (cpu)."""
    model = tiny_model("llama", tie_word_embeddings=True)
    rules = [
        rule(r"^model\.layers\.1$", "default", device="cpu"),
        rule(r"^model\.norm$", "operators.norm.RMSNorm"),
    ]
    _, report = optimize(model, rules)

    place(model, report, torch.device("meta"))

    devices = {name: p.device.type for name, p in model.named_parameters()}
    assert {d for name, d in devices.items() if name.startswith("model.layers.1.")} == {"cpu"}
    assert {d for name, d in devices.items() if not name.startswith("model.layers.1.")} == {"meta"}
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied weights stay tied"
    assert [(r.name, r.device) for r in report.replacements] == [
        ("model.layers.1", "cpu"),
        ("model.norm", "-"),
    ]


def test_a_missing_device_from_a_variable_names_the_override(llama: nn.Module) -> None:
    rules = {"vars": {"gpu": MISSING_CUDA}, "rules": [rule(r"^lm_head$", device="${gpu}")]}

    with pytest.raises(DeviceError) as caught:
        optimize(llama, rules)

    one_sentence(caught.value, f"'{MISSING_CUDA}'", "--set gpu=")


def test_an_override_passed_to_optimize_sets_a_variable(llama: nn.Module) -> None:
    rules = {"vars": {"gpu": MISSING_CUDA}, "rules": [rule(r"^lm_head$", device="${gpu}")]}

    _, report = optimize(llama, rules, gpu="cpu")

    assert [(r.name, r.device, r.pinned) for r in report.replacements] == [("lm_head", "cpu", True)]


def test_an_unknown_override_passed_to_optimize_is_an_error(llama: nn.Module) -> None:
    with pytest.raises(RuleError) as caught:
        optimize(llama, LLAMA_RULES, gpu="cpu")

    one_sentence(caught.value, "--set gpu=cpu", "'gpu'")


def test_vars_select_modules_by_name(llama: nn.Module) -> None:
    rules = {
        "vars": {"layer": 0},
        "rules": [rule(r"^model\.layers\.${layer}\.mlp$", "operators.mlp.FusedGatedMLP")],
    }

    assert names(optimize(tiny_model("llama"), rules)[1]) == ["model.layers.0.mlp"]
    assert names(optimize(llama, rules, layer=1)[1]) == ["model.layers.1.mlp"]


# --- the report ---------------------------------------------------------------------------------


def test_the_report_names_module_rule_operator_and_device(tmp_path: Path, llama) -> None:
    path = write(
        tmp_path,
        "mine.yaml",
        r"""
        rules:
          - match: {name: '^model\.layers\.0\.mlp$'}
            replace: {class: operators.mlp.FusedGatedMLP, device: cpu}
            recursive: false

          - match: {class: LlamaRMSNorm, name: '^model\.norm$'}
            replace: {class: operators.norm.RMSNorm}
        """,
    )

    _, report = optimize(llama, path)

    assert report.rows() == [
        ("model.layers.0.mlp", "mine.yaml #0 (line 2)", "LlamaMLP", "FusedGatedMLP", "cpu"),
        ("model.norm", "mine.yaml #1 (line 6)", "LlamaRMSNorm", "RMSNorm", "cpu"),
    ]
    assert [r.pinned for r in report.replacements] == [True, False]
    assert report.sources == [str(path)]
    assert report.unmatched == [] and report.notes == []


def test_the_report_locates_rules_of_the_shipped_file(llama: nn.Module) -> None:
    shipped = load_rules(LLAMA_RULES).rules

    _, report = optimize(llama, "llama")

    for row in report.replacements:
        index = int(re.search(r"#(\d+)", row.rule).group(1))
        assert row.rule == f"llama.yaml #{index} (line {shipped[index].line})"
    assert {r.name for r in report.replacements} >= {*MLPS, *NORMS}


def test_a_rule_that_matches_nothing_is_a_warning_naming_it(llama: nn.Module) -> None:
    rules = [rule(r"^lm_head$"), rule(r"^model\.nothing$")]

    with pytest.warns(UnmatchedRuleWarning) as caught:
        _, report = optimize(llama, rules)

    (warning,) = caught
    assert "<rules> rule 1" in str(warning.message)
    assert "'^model\\\\.nothing$'" in str(warning.message)
    assert report.unmatched == ["<rules> rule 1"]
    assert names(report) == ["lm_head"], "the other rules still apply"


def test_a_rule_that_matches_nothing_is_an_error_under_strict(tmp_path: Path, llama) -> None:
    path = write(
        tmp_path,
        "strict.yaml",
        """
        rules:
          - match: {name: '^lm_head$'}
            replace: {class: default}
          - match: {class: MixtralSparseMoeBlock}
            replace: {class: default}
        """,
    )

    with pytest.raises(UnmatchedRuleError) as caught:
        optimize(llama, path, strict=True)

    one_sentence(caught.value, f"{path} rule 1, line 4", "'MixtralSparseMoeBlock'", "--strict")


def test_the_plain_list_style_places_on_generate_device_and_notes_prefill(
    tmp_path: Path, llama: nn.Module
) -> None:
    path = write(
        tmp_path,
        "kt.yaml",
        r"""
        - match:
            name: "^model\\.layers\\..*\\.mlp$"
            class: transformers.models.llama.modeling_llama.LlamaMLP
          replace:
            class: operators.mlp.FusedGatedMLP
            kwargs: {generate_device: "cpu", prefill_device: "cpu"}
          recursive: False
        - match: {name: "^lm_head$"}
          replace:
            class: "default"
            kwargs: {generate_device: "cpu", prefill_device: "cuda:1"}
        """,
    )

    _, report = optimize(llama, path)

    assert [(r.name, r.operator, r.device, r.pinned) for r in report.replacements] == [
        *((mlp, "FusedGatedMLP", "cpu", True) for mlp in MLPS),
        ("lm_head", "default", "cpu", True),
    ]
    (note,) = report.notes
    assert f"{path} rule 1, line 8" in note and "prefill_device 'cuda:1'" in note


# --- operators that cannot be built -------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "fragments"),
    [
        (
            rule(r"^lm_head$", "operators.mlp.FusedGatedMLP"),
            ["operators.mlp.FusedGatedMLP", "lm_head", "Linear", "replace.class"],
        ),
        (
            rule(r"^model\.norm$", "operators.norm.RMSNorm", kwargs={"threads": 4}),
            ["operators.norm.RMSNorm", "model.norm", "threads", "replace.kwargs"],
        ),
        (
            rule(r"^lm_head$", "torch.nn.Linear"),
            ["torch.nn.Linear", "lm_head", "replace.kwargs"],
        ),
    ],
    ids=["wrong module", "unknown kwarg", "constructor needs kwargs"],
)
def test_an_operator_that_cannot_be_built_is_one_sentence(llama, bad, fragments) -> None:
    with pytest.raises(RuleError) as caught:
        optimize(llama, [bad])

    one_sentence(caught.value, "<rules> rule 0", *fragments)


def test_an_external_operator_is_used_when_allowed(llama: nn.Module) -> None:
    rules = [rule(r"^lm_head$", "external_operators.ScaleBy", kwargs={"factor": 3.0})]
    with pytest.raises(RuleError):
        optimize(tiny_model("llama"), rules)

    _, report = optimize(llama, rules, allow_external_operators=True)

    assert isinstance(llama.lm_head, ScaleBy) and llama.lm_head.factor == 3.0
    assert report.rows()[0][3] == "ScaleBy"


# --- end to end: the patched model generates what the original does ------------------------------


def test_an_already_loaded_model_generates_the_same_tokens() -> None:
    reference = tiny_model("llama")
    patched, report = optimize(tiny_model("llama"), LLAMA_RULES)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))

    assert len(report.replacements) > 0 and report.unmatched == []
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(patched), greedy(reference))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_model_patched_on_meta_generates_the_same_tokens_once_loaded(tied: bool) -> None:
    """The loading path: build on meta, apply the rules, assign the weights, tie, place."""
    reference = tiny_model("llama", tie_word_embeddings=tied)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=tied))

    model, report = optimize(model, LLAMA_RULES)
    weighted = {r.device for r in report.replacements if r.name != "model.rotary_emb"}
    assert weighted == {"-"}, "no weights are placed while on meta"  # rotary: HF's CPU buffer
    assert any(p.is_meta for p in model.parameters())

    model.load_state_dict(reference.state_dict(), assign=True)
    model.tie_weights()
    place(model, report, torch.device("cpu"))
    model.eval()

    assert not any(p.is_meta for p in model.parameters())
    assert {r.device for r in report.replacements} == {"cpu"}
    assert isinstance(model.model.layers[0].mlp, FusedGatedMLP)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    assert torch.equal(greedy(model), greedy(reference))


# --- properties over random module trees --------------------------------------------------------

PART = st.sampled_from(["model", "layers", "mlp", "attn", "norm", "gate_proj", "0", "1", "12"])
MODULE_NAMES = st.lists(st.lists(PART, min_size=1, max_size=4).map(".".join), max_size=8)
PATTERN = st.sampled_from(
    [r"mlp", r"^model", r"\d+$", r"layers\.\d+", r"^model\.layers\.\d+\.mlp$", r"norm$", r"."]
)


def module_tree(dotted_names: list[str]) -> nn.Module:
    """A tree of empty modules in which every name (and each of its prefixes) exists."""
    root = nn.Module()
    for dotted in dotted_names:
        parent = root
        for part in dotted.split("."):
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
    return root


@settings(max_examples=150, deadline=None)
@given(dotted_names=MODULE_NAMES, pattern=PATTERN, recursive=st.booleans())
def test_a_rule_acts_on_exactly_the_modules_whose_names_it_searches(
    dotted_names: list[str], pattern: str, recursive: bool
) -> None:
    """With `recursive: true` every module whose dotted name `re.search`es the pattern is acted
    on; with `false`, those without an acted-on ancestor."""
    model = module_tree(dotted_names)
    every = [name for name, _ in model.named_modules() if name]
    hits = [name for name in every if re.search(pattern, name)]
    if not recursive:
        hits = [n for n in hits if not any(n.startswith(f"{h}.") for h in hits)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmatchedRuleWarning)
        _, report = optimize(model, [rule(pattern, recursive=recursive)])

    assert names(report) == hits
    assert report.unmatched == ([] if hits else ["<rules> rule 0"])
