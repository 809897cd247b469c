"""Rule files: parsing, validation, `extends`, `vars`, overrides and the plain-list style.

These tests read rule documents only; nothing here builds a model (tests/test_inject.py applies
rules to models). Every bad input must raise a `KtinjectError` subclass whose message is one line
naming the offending value and the key or flag that fixes it, and, for a file, the file and line.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from assertions import one_sentence
from external_operators import ScaleBy
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from ktinject.errors import DeviceError, RuleError
from ktinject.rules import (
    RuleSet,
    builtin_rules_dir,
    class_matches,
    find_rule_file,
    load_rules,
    parse_override,
)

#: A CUDA device this machine does not have (cuda:3 on a CPU-only machine).
MISSING_CUDA = f"cuda:{torch.cuda.device_count() + 3}"


EXTERNAL_OPERATOR = "external_operators.ScaleBy"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def line_of(path: Path, marker: str, occurrence: int = 0) -> int:
    """1-based line of the `occurrence`-th line of `path` containing `marker`."""
    lines = [i + 1 for i, text in enumerate(path.read_text().splitlines()) if marker in text]
    return lines[occurrence]


def rule(name: str | None = None, cls: str = "default", **extra: object) -> dict:
    """An in-memory rule: match on `name`, replace with `cls`; `extra` keys go under replace."""
    return {"match": {"name": name}, "replace": {"class": cls, **extra}}


# --- a valid file --------------------------------------------------------------------------------


def test_a_rule_file_becomes_typed_rules_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "two.yaml",
        r"""
        rules:
          - match:
              name: '^model\.layers\.\d+\.mlp$'
              class: LlamaMLP
            replace:
              class: operators.mlp.FusedGatedMLP
              device: cpu
            recursive: false
          - match:
              class: LlamaRMSNorm
            replace:
              class: default
        """,
    )
    rules = load_rules(path).rules

    assert [r.index for r in rules] == [0, 1]
    mlp, norm = rules
    assert mlp.name_pattern.pattern == r"^model\.layers\.\d+\.mlp$"
    assert mlp.match_class == "LlamaMLP"
    assert mlp.operator.__name__ == "FusedGatedMLP"
    assert mlp.device == torch.device("cpu")
    assert mlp.recursive is False
    assert norm.name_pattern is None
    assert norm.operator is None and norm.replace_class == "default"
    assert norm.device is None
    assert norm.recursive is True, "recursive defaults to true"


def test_a_rule_knows_its_file_index_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "where.yaml",
        """
        # a comment first, so lines and indices differ
        rules:
          - match: {name: a}
            replace: {class: default}

          - match: {name: b}
            replace: {class: default}
        """,
    )
    second = load_rules(path).rules[1]

    assert second.source == str(path)
    assert second.index == 1
    assert second.line == line_of(path, "name: b")
    assert second.where == f"{path} rule 1, line {second.line}"


def test_shipped_rule_files_are_found_by_name_and_by_stem() -> None:
    shipped = builtin_rules_dir() / "llama.yaml"

    assert find_rule_file("llama.yaml") == shipped
    assert find_rule_file("llama") == shipped
    assert load_rules("llama").sources == [str(shipped)]


def test_no_rules_is_an_empty_rule_set() -> None:
    assert load_rules(None).rules == []


def test_a_rule_set_passes_through_unchanged() -> None:
    rule_set = load_rules([rule("x")])

    assert load_rules(rule_set) is rule_set


# --- class filters (no import happens: matching is by name) --------------------------------------


class MyRMSNorm(LlamaRMSNorm):
    """A user subclass: rules written for its base must still match it."""


@pytest.mark.parametrize(
    ("cls", "wanted", "expected"),
    [
        (LlamaRMSNorm, "LlamaRMSNorm", True),
        (LlamaRMSNorm, "transformers.models.llama.modeling_llama.LlamaRMSNorm", True),
        (LlamaRMSNorm, "LlamaMLP", False),
        (LlamaRMSNorm, "other.package.LlamaRMSNorm", False),
        (MyRMSNorm, "LlamaRMSNorm", True),
        (MyRMSNorm, "transformers.models.llama.modeling_llama.LlamaRMSNorm", True),
        (MyRMSNorm, f"{__name__}.MyRMSNorm", True),
        (LlamaMLP, "Module", True),
        (LlamaMLP, "torch.nn.modules.module.Module", True),
    ],
)
def test_class_filter_has_isinstance_semantics(cls: type, wanted: str, expected: bool) -> None:
    """A short name matches any class in the MRO by `__name__`; a dotted name matches
    `module.qualname` of any class in the MRO."""
    assert class_matches(cls, wanted) is expected


def test_a_rule_needs_both_name_and_class_to_match() -> None:
    both_keys = {
        "match": {"name": "norm$", "class": "LlamaRMSNorm"},
        "replace": {"class": "default"},
    }
    (both,) = load_rules([both_keys]).rules
    norm = LlamaRMSNorm(8)

    assert both.matches("model.norm", norm)
    assert not both.matches("model.embed", norm), "name differs"
    assert not both.matches("model.norm", nn.LayerNorm(8)), "class differs"


# --- name patterns are re.search over the dotted name --------------------------------------------

NAME_PART = st.one_of(st.from_regex(r"[a-z_]{1,6}", fullmatch=True), st.integers(0, 12).map(str))
MODULE_NAME = st.lists(NAME_PART, min_size=1, max_size=5).map(".".join)
REGEX_ATOM = st.one_of(
    NAME_PART.map(re.escape),
    st.sampled_from([r"\.", r"\d+", r"\d", ".*", ".", "[a-z_]+", "(mlp|attn)", "(?:\\.\\d+)?"]),
)
REGEX = st.builds(
    lambda start, atoms, end: ("^" if start else "") + "".join(atoms) + ("$" if end else ""),
    st.booleans(),
    st.lists(REGEX_ATOM, min_size=1, max_size=4),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(pattern=REGEX, name=MODULE_NAME)
@example(pattern=r"^model\.layers\.\d+\.mlp$", name="model.layers.11.mlp")
@example(pattern=r"^model\.layers\.\d+\.mlp$", name="model.layers.11.mlp.down_proj")
@example(pattern=r"mlp", name="model.layers.0.mlp.gate_proj")
def test_a_name_pattern_matches_exactly_when_re_search_does(pattern: str, name: str) -> None:
    (compiled,) = load_rules([rule(pattern)]).rules

    assert compiled.matches(name, nn.Identity()) is bool(re.search(pattern, name))


# --- extends ------------------------------------------------------------------------------------


@pytest.fixture
def base_and_child(tmp_path: Path) -> tuple[Path, Path]:
    """base/base.yaml and variants/child.yaml, which extends it by a relative path."""
    base = write(
        tmp_path,
        "base/base.yaml",
        """
        vars: {dev: "meta", who: base, only_base: 1}
        rules:
          - match: {name: '^base$'}
            replace: {class: default, device: "${dev}", kwargs: {who: "${who}"}}
        """,
    )
    child = write(
        tmp_path,
        "variants/child.yaml",
        """
        extends: ../base/base.yaml
        vars: {dev: "cpu", who: child}
        rules:
          - match: {name: '^child$'}
            replace: {class: default, kwargs: {only_base: "${only_base}"}}
        """,
    )
    return base, child


def test_extends_puts_the_base_rules_after_ours(base_and_child: tuple[Path, Path]) -> None:
    base, child = base_and_child
    rule_set = load_rules(child)

    assert [r.name_pattern.pattern for r in rule_set.rules] == ["^child$", "^base$"]
    assert [Path(r.source).resolve() for r in rule_set.rules] == [child, base.resolve()]
    assert [Path(s).resolve() for s in rule_set.sources] == [child, base.resolve()]


def test_our_vars_override_the_bases_and_apply_to_its_rules(
    base_and_child: tuple[Path, Path],
) -> None:
    _, child = base_and_child
    rule_set = load_rules(child)
    ours, theirs = rule_set.rules

    assert rule_set.variables == {"dev": "cpu", "who": "child", "only_base": 1}
    assert theirs.device == torch.device("cpu"), "the base rule sees our ${dev}"
    assert theirs.kwargs == {"who": "child"}
    assert ours.kwargs == {"only_base": 1}, "our rules see the base's variables"


def test_extends_is_resolved_relative_to_the_extending_file(
    base_and_child: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, child = base_and_child
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    assert len(load_rules(child).rules) == 2
    assert len(load_rules(Path("..") / "variants" / "child.yaml").rules) == 2


def test_extends_can_name_a_shipped_file(tmp_path: Path) -> None:
    child = write(
        tmp_path,
        "mine.yaml",
        """
        extends: llama.yaml
        rules:
          - match: {class: LlamaRMSNorm}
            replace: {class: default}
        """,
    )
    shipped = load_rules("llama").rules
    rules = load_rules(child).rules

    assert len(rules) == 1 + len(shipped)
    assert rules[0].source == str(child)
    assert [(r.source, r.index, r.replace_class) for r in rules[1:]] == [
        (r.source, r.index, r.replace_class) for r in shipped
    ]


def test_an_in_memory_document_can_extend_a_shipped_file() -> None:
    rules = load_rules({"extends": "llama", "rules": [rule("^lm_head$")]}).rules

    assert rules[0].source == "<rules>"
    assert Path(rules[1].source).name == "llama.yaml"


# --- vars and ${...} interpolation --------------------------------------------------------------


def test_vars_interpolate_into_name_patterns_devices_and_kwargs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "vars.yaml",
        r"""
        vars: {layer: 1, dev: cpu, threads: 16, gpu_index: 0}
        rules:
          - match: {name: '^model\.layers\.${layer}\.mlp$'}
            replace:
              class: default
              device: "${dev}"
              kwargs: {threads: "${threads}", out: "cuda:${gpu_index}", nested: ["${dev}"]}
        """,
    )
    (compiled,) = load_rules(path).rules

    assert compiled.name_pattern.pattern == r"^model\.layers\.1\.mlp$"
    assert compiled.device == torch.device("cpu")
    assert compiled.kwargs == {"threads": 16, "out": "cuda:0", "nested": ["cpu"]}
    assert isinstance(compiled.kwargs["threads"], int), "a whole-value ${var} keeps its type"


def test_overrides_replace_vars(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gpu.yaml",
        f"""
        vars: {{gpu: "{MISSING_CUDA}", threads: 4}}
        rules:
          - match: {{name: x}}
            replace: {{class: default, device: "${{gpu}}", kwargs: {{threads: "${{threads}}"}}}}
        """,
    )
    overrides = dict(map(parse_override, ["gpu=cpu", "threads=8"]))
    rule_set = load_rules(path, overrides)

    assert rule_set.variables == {"gpu": "cpu", "threads": 8}
    assert rule_set.rules[0].device == torch.device("cpu")
    assert rule_set.rules[0].kwargs == {"threads": 8}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("threads=8", ("threads", 8)),
        ("gpu=cuda:1", ("gpu", "cuda:1")),
        ("gpu=cpu", ("gpu", "cpu")),
        ("ratio=0.5", ("ratio", 0.5)),
        ("pin=true", ("pin", True)),
        ("list=[1, 2]", ("list", [1, 2])),
        ("empty=", ("empty", "")),
        ("  spaced  =cpu", ("spaced", "cpu")),
        ("eq=a=b", ("eq", "a=b")),
        ("broken=[1, 2", ("broken", "[1, 2")),
        ("day=2024-01-01", ("day", "2024-01-01")),
        ("tag=!!float abc", ("tag", "!!float abc")),
    ],
)
def test_an_override_value_is_read_as_yaml_else_kept_as_text(
    text: str, expected: tuple[str, object]
) -> None:
    assert parse_override(text) == expected


IDENTIFIER = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
OVERRIDE_VALUE = st.one_of(
    st.integers(),
    st.booleans(),
    st.integers(0, 15).map(lambda i: f"cuda:{i}"),
    st.sampled_from(["cpu", "cuda", "meta"]),
    # PyYAML reads YAML 1.1, where a float needs a '.', so `1e-05` stays text: keep to those
    # written with a point and no exponent.
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: "e" not in repr(x)),
)


@given(key=IDENTIFIER, value=OVERRIDE_VALUE)
def test_override_values_round_trip(key: str, value: object) -> None:
    written = str(value).lower() if isinstance(value, bool) else repr(value)
    written = written.strip("'")

    assert parse_override(f"{key}={written}") == (key, value)


@given(text=st.text())
@example(text="x=!!timestamp 2020-99")
@example(text="x=!!binary ~~~")
@example(text="x=!!python/object:os.system ls")
def test_parse_override_never_raises_anything_but_a_rule_error(text: str) -> None:
    try:
        key, _ = parse_override(text)
    except RuleError as error:
        one_sentence(error, "--set", "key=value")
    else:
        assert key == text.partition("=")[0].strip()


# --- the plain-list (KTransformers) style --------------------------------------------------------


def test_a_plain_top_level_list_is_a_rule_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "kt.yaml",
        r"""
        - match:
            name: "^model\\.layers\\..*\\.mlp$"
            class: transformers.models.llama.modeling_llama.LlamaMLP
          replace:
            class: operators.mlp.FusedGatedMLP
            kwargs:
              generate_device: "cpu"
              prefill_device: "cpu"
        - match:
            name: "^model\\.norm$"
          replace:
            class: "default"
            kwargs:
              generate_device: "cpu"
              prefill_device: "cuda:0"
              extra: 1
        """,
    )
    rule_set = load_rules(path)
    mlp, norm = rule_set.rules

    assert mlp.line == line_of(path, "- match:", 0)
    assert norm.line == line_of(path, "- match:", 1)
    assert mlp.device == norm.device == torch.device("cpu"), "device comes from generate_device"
    assert mlp.kwargs == {}, "generate_device / prefill_device are not operator kwargs"
    assert norm.kwargs == {"extra": 1}
    (note,) = rule_set.notes
    assert f"{path} rule 1, line {norm.line}" in note
    assert "prefill_device 'cuda:0'" in note, "a differing prefill_device is a note, not an error"


def test_an_explicit_device_wins_over_generate_device() -> None:
    (compiled,) = load_rules([rule("x", device="meta", kwargs={"generate_device": "cpu"})]).rules

    assert compiled.device == torch.device("meta")


# --- replace.class and the allow-list -----------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["operators.mlp.FusedGatedMLP", "torch.nn.Identity", "transformers.activations.SiLUActivation"],
)
def test_allow_listed_operators_import(path: str) -> None:
    (compiled,) = load_rules([rule("x", path)]).rules

    assert issubclass(compiled.operator, nn.Module)
    assert compiled.operator.__name__ == path.rpartition(".")[2]


def test_an_external_operator_is_refused_by_default() -> None:
    with pytest.raises(RuleError) as caught:
        load_rules([rule("x", EXTERNAL_OPERATOR)])

    one_sentence(
        caught.value,
        f"replace.class {EXTERNAL_OPERATOR!r}",
        "--allow-external-operators",
        "allow_external_operators=True",
    )


def test_allow_external_operators_lets_an_importable_module_through() -> None:
    (compiled,) = load_rules(
        [rule("x", EXTERNAL_OPERATOR, kwargs={"factor": 3.0})], allow_external_operators=True
    ).rules

    assert compiled.operator is ScaleBy
    assert compiled.kwargs == {"factor": 3.0}


def test_allow_external_operators_still_requires_an_nn_module() -> None:
    with pytest.raises(RuleError) as caught:
        load_rules([rule("x", "collections.OrderedDict")], allow_external_operators=True)

    one_sentence(caught.value, "'collections.OrderedDict'", "replace.class", "torch.nn.Module")


# --- every bad input: one sentence naming the value, the key to fix, the file and line -----------

#: The bad rule is rule 1 of a file (see `bad_rule_file`): its keys, then the fragments its message
#: must contain besides the file, "rule 1" and the line.
BAD_RULES = {
    "unknown rule key": (
        {"recursve": "false"},
        ["unknown key 'recursve'", "did you mean 'recursive'?"],
    ),
    "unknown match key": (
        {"match": "{nmae: b}"},
        ["unknown match key 'nmae'", "did you mean 'name'?"],
    ),
    "unknown replace key": (
        {"replace": "{class: default, devcie: cpu}"},
        ["unknown replace key 'devcie'", "did you mean 'device'?"],
    ),
    "bad regex": (
        {"match": "{name: 'model.(layers'}"},
        ["match.name 'model.(layers'", "not a valid regex"],
    ),
    "class not importable": (
        {"replace": "{class: operators.nope.FastThing}"},
        ["replace.class 'operators.nope.FastThing'", "cannot be imported"],
    ),
    "class missing from its module": (
        {"replace": "{class: operators.mlp.NoSuchMLP}"},
        ["replace.class 'operators.mlp.NoSuchMLP'", "no 'NoSuchMLP'"],
    ),
    "class not an nn.Module": (
        {"replace": "{class: ktinject.errors.RuleError}"},
        ["replace.class 'ktinject.errors.RuleError'", "not a torch.nn.Module"],
    ),
    "class outside the allow-list": (
        {"replace": "{class: collections.OrderedDict}"},
        ["replace.class 'collections.OrderedDict'", "--allow-external-operators"],
    ),
    "class not dotted": (
        {"replace": "{class: operators}"},
        ["replace.class 'operators'", "dotted path"],
    ),
    "device missing here": (
        {"replace": f"{{class: default, device: '{MISSING_CUDA}'}}"},
        [f"device '{MISSING_CUDA}' does not exist", "replace.device"],
    ),
    "device from generate_device": (
        {"replace": f"{{class: default, kwargs: {{generate_device: '{MISSING_CUDA}'}}}}"},
        [f"device '{MISSING_CUDA}' does not exist", "replace.kwargs.generate_device"],
    ),
    "device from a variable": (
        {"replace": "{class: default, device: '${gpu}'}"},
        [f"device '{MISSING_CUDA}' does not exist", "--set gpu="],
    ),
    "not a device name": (
        {"replace": "{class: default, device: 'gpu0'}"},
        ["'gpu0' is not a device name", "replace.device"],
    ),
    "unknown variable": (
        {"match": "{name: '${gpus}'}"},
        ["${gpus}", "vars:", "--set gpus="],
    ),
    "variable naming an unknown variable": (
        {"match": "{name: '${indirect}'}"},
        ["'nowhere'", "vars:"],
    ),
    "recursive not a boolean": (
        {"recursive": "sometimes"},
        ["'recursive'", "'sometimes'"],
    ),
    "match missing": (
        {"match": None},
        ["'match' must be a mapping"],
    ),
    "match empty": (
        {"match": "{}"},
        ["'match' must be a mapping", "'name' and/or 'class'"],
    ),
    "replace without class": (
        {"replace": "{device: cpu}"},
        ["'replace' must be a mapping with at least 'class'"],
    ),
    "kwargs not a mapping": (
        {"replace": "{class: default, kwargs: [1, 2]}"},
        ["replace.kwargs must be a mapping of keyword arguments", "not a list ([1, 2])"],
    ),
    "kwargs key not a name": (
        {"replace": "{class: default, kwargs: {1: 2}}"},
        ["replace.kwargs key 1", "not a keyword argument name"],
    ),
    "name not a string": (
        {"match": "{name: 5}"},
        ["match.name must be a string (a regex), not int 5", "name: '5'"],
    ),
    "bad regex from a variable": (
        {"match": "{name: 'x${open}'}"},
        ["match.name 'x('", "not a valid regex", "${open} = '(' under vars:", "--set open="],
    ),
}


def bad_rule_file(directory: Path, changes: dict[str, str | None]) -> Path:
    """A file whose rule 0 is valid and whose rule 1 is `match`/`replace` with `changes` applied
    (a key set to None is left out)."""
    keys = {"match": "{name: b}", "replace": "{class: default}", **changes}
    lines = [f"{key}: {value}" for key, value in keys.items() if value is not None]
    item = "  - " + "\n    ".join(lines)
    path = directory / "bad.yaml"
    path.write_text(
        f"vars: {{gpu: '{MISSING_CUDA}', indirect: '${{nowhere}}', open: '('}}\n"
        "rules:\n"
        "  - match: {name: a}\n"
        "    replace: {class: default}\n"
        f"{item}\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("case", list(BAD_RULES))
def test_a_bad_rule_is_one_sentence_with_file_rule_and_line(tmp_path: Path, case: str) -> None:
    bad_line, fragments = BAD_RULES[case]
    path = bad_rule_file(tmp_path, bad_line)

    with pytest.raises(RuleError) as caught:
        load_rules(path)

    one_sentence(caught.value, f"{path} rule 1, line 5:", *fragments)


def test_a_bad_regex_from_an_override_names_the_set_flag(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "split.yaml",
        """
        vars: {second: '1'}
        rules:
          - match: {name: '^(${second})$'}
            replace: {class: default}
        """,
    )

    with pytest.raises(RuleError) as caught:
        load_rules(path, {"second": "("})

    one_sentence(caught.value, f"{path} rule 0, line 3:", "not a valid regex", "--set second=(:")


def test_a_number_from_a_variable_is_a_name_pattern() -> None:
    document = {"vars": {"layer": 5}, "rules": [rule("${layer}")]}

    assert load_rules(document).rules[0].name_pattern == re.compile("5")


def test_a_bad_device_is_a_device_error(tmp_path: Path) -> None:
    path = bad_rule_file(tmp_path, BAD_RULES["device missing here"][0])

    with pytest.raises(DeviceError):
        load_rules(path)


def test_a_device_override_can_fix_a_device_that_is_missing_here(tmp_path: Path) -> None:
    path = bad_rule_file(tmp_path, BAD_RULES["device from a variable"][0])

    assert load_rules(path, {"gpu": "cpu"}).rules[1].device == torch.device("cpu")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("rules:\n  - match:\n      name: x: y\n    replace: {class: default}\n", 3),
        ("rules:\n  - match: {name: x}\n\treplace: {class: default}\n", 3),
        ("rules:\n  - match: {name: x}\n    replace: {class: default\n  - match: {name: y}\n", 4),
    ],
    ids=["colon in a value", "tab indent", "unclosed flow mapping"],
)
def test_malformed_yaml_names_the_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(RuleError) as caught:
        load_rules(path)

    one_sentence(caught.value, f"{path}:{line}:", "malformed YAML")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            "rule:\n  - match: {name: x}\n",
            ["unknown top-level key 'rule'", "did you mean 'rules'?"],
        ),
        ("rules: {match: {name: x}}\n", ["'rules' must be a list"]),
        ("vars: [1, 2]\nrules: []\n", ["'vars' must be a mapping"]),
        ("just a string\n", ["must be a mapping with 'rules:' or a list of rules"]),
        ("rules:\n  - just a string\n", ["rule 0, line 2", "must be a mapping"]),
        ("extends: no-such-base.yaml\n", ["extends 'no-such-base.yaml'", "llama.yaml"]),
    ],
)
def test_a_bad_document_is_one_sentence_naming_the_file(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(RuleError) as caught:
        load_rules(path)

    one_sentence(caught.value, str(path), *fragments)


def test_a_missing_rule_file_lists_the_shipped_ones() -> None:
    with pytest.raises(RuleError) as caught:
        load_rules("no-such-rules.yaml")

    one_sentence(caught.value, "'no-such-rules.yaml' does not exist", "llama.yaml")


def test_a_rule_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00rules")

    with pytest.raises(RuleError) as caught:
        load_rules(path)

    one_sentence(caught.value, f"{str(path)!r} is not UTF-8 text", "0xff")


def test_a_directory_is_not_a_rule_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path)

    one_sentence(caught.value, f"{str(tmp_path)!r} is a directory", "(.yaml)", "llama.yaml")


def test_an_unknown_override_names_it_and_the_files_vars(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gpu.yaml",
        """
        vars: {gpu: cpu, threads: 4}
        rules: []
        """,
    )

    with pytest.raises(RuleError) as caught:
        load_rules(path, {"gpus": "cpu"})

    one_sentence(caught.value, "--set gpus=cpu", "'gpus'", "gpu, threads", "vars:")


def test_an_override_without_a_rule_file_is_an_error() -> None:
    with pytest.raises(RuleError) as caught:
        load_rules(None, {"gpu": "cpu"})

    one_sentence(caught.value, "--set gpu")


def test_an_override_cannot_change_a_resolved_rule_set() -> None:
    with pytest.raises(RuleError) as caught:
        load_rules(RuleSet(rules=[]), {"gpu": "cpu"})

    one_sentence(caught.value, "RuleSet")


@pytest.mark.parametrize("text", ["threads", "=cpu", " =cpu", ""])
def test_an_override_must_be_key_equals_value(text: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_override(text)

    one_sentence(caught.value, f"--set {text!r}", "key=value")


def test_an_extends_cycle_is_named(tmp_path: Path) -> None:
    first = write(tmp_path, "first.yaml", "extends: second.yaml\nrules: []\n")
    write(tmp_path, "second.yaml", "extends: first.yaml\nrules: []\n")

    with pytest.raises(RuleError) as caught:
        load_rules(first)

    one_sentence(caught.value, "'extends' forms a cycle", "first.yaml -> second.yaml -> first.yaml")


def test_a_file_extending_itself_is_a_cycle(tmp_path: Path) -> None:
    path = write(tmp_path, "self.yaml", "extends: self.yaml\n")

    with pytest.raises(RuleError) as caught:
        load_rules(path)

    one_sentence(caught.value, "'extends' forms a cycle", "self.yaml -> self.yaml")


def test_a_chain_of_extends_is_followed_to_its_end(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "rules: [{match: {name: base}, replace: {class: default}}]\n")
    write(tmp_path, "middle.yaml", "extends: base.yaml\n")
    top = write(tmp_path, "top.yaml", "extends: middle.yaml\n")

    assert [Path(s).name for s in load_rules(top).sources] == [
        "top.yaml",
        "middle.yaml",
        "base.yaml",
    ]


def test_resolvers_such_as_environment_lookups_are_refused() -> None:
    document = {"rules": [{"match": {"name": "${oc.env:HOME}"}, "replace": {"class": "default"}}]}
    with pytest.raises(RuleError, match=r"oc\.env:HOME.*calls a resolver"):
        load_rules(document)
    hidden = {
        "vars": {"home": "${oc.env:HOME}"},
        "rules": [{"match": {"name": "${home}"}, "replace": {"class": "default"}}],
    }
    with pytest.raises(RuleError, match="calls a resolver"):
        load_rules(hidden)


@pytest.mark.parametrize(("text", "value"), [("1e-5", 1e-5), ("2E3", 2000.0), (".5e1", 5.0)])
def test_exponent_floats_are_floats_in_rules_and_overrides(
    tmp_path: Path, text: str, value: float
) -> None:
    """YAML 1.1 (PyYAML's default) would keep `1e-5` a string and hand it to an operator."""
    assert parse_override(f"eps={text}") == ("eps", value)
    rule_file = tmp_path / "floats.yaml"
    rule_file.write_text(f"vars: {{eps: {text}}}\nrules: []\n")
    assert load_rules(rule_file).variables == {"eps": value}


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("False", False), ("off", "off"), ("no", "no"), ("Yes", "Yes"), ("on", "on")],
)
def test_only_true_and_false_are_booleans(tmp_path: Path, text: str, value: bool | str) -> None:
    """YAML 1.1 would turn a var set to `off` or `no` (a device named `on`, ...) into a bool."""
    assert parse_override(f"flag={text}") == ("flag", value)
    rule_file = tmp_path / "bools.yaml"
    rule_file.write_text(f"vars: {{flag: {text}}}\nrules: []\n")
    assert load_rules(rule_file).variables == {"flag": value}


def test_recursive_yes_is_refused_in_one_sentence(tmp_path: Path) -> None:
    rule_file = tmp_path / "yes.yaml"
    rule_file.write_text(
        "rules:\n  - match: {name: x}\n    replace: {class: default}\n    recursive: yes\n"
    )
    with pytest.raises(RuleError) as caught:
        load_rules(rule_file)
    one_sentence(caught.value, "'recursive' must be true or false", "'yes'")
