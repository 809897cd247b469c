"""Rule files: parse, validate and resolve them into typed `Rule`s.

A rule says which modules to replace (a regex over the dotted module name and/or a class name) and
with what (an operator class, its device, its keyword arguments). Everything a user can get wrong in
a rule file is caught here, before any model is touched, and reported in one sentence naming the
file, the rule's index and line, and the key to fix.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ktinject.devices import check_device
from ktinject.errors import RuleError
from ktinject.yaml_files import read_text, yaml_problem

ALLOWED_OPERATOR_PREFIXES = ("operators.", "ktinject.", "torch.nn.", "transformers.")
TOP_KEYS = ("extends", "vars", "rules")
RULE_KEYS = ("match", "replace", "recursive")
MATCH_KEYS = ("name", "class")
REPLACE_KEYS = ("class", "device", "kwargs")
VAR_PATTERN = re.compile(r"\$\{([^}]+)\}")


class RuleLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's scalars where 1.1 surprises: `1e-5` is a float (1.1
    wants `1.0e-5` and would hand an operator the string "1e-5"), and only true/false are
    booleans (1.1 also turns yes/no/on/off into booleans, so a var set to `off` or `no` would
    silently become False)."""


RuleLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
RuleLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in RuleLoader.yaml_implicit_resolvers.items()
}
RuleLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
GENERATE_DEVICE_KEY = "replace.kwargs.generate_device"


@dataclass(frozen=True)
class Rule:
    """One validated rule; `where` locates it for messages and reports."""

    source: str
    index: int
    line: int | None
    name_pattern: re.Pattern[str] | None
    match_class: str | None
    replace_class: str
    operator: type[torch.nn.Module] | None
    device: torch.device | None
    kwargs: dict[str, Any]
    recursive: bool

    @property
    def where(self) -> str:
        line = f", line {self.line}" if self.line is not None else ""
        return f"{self.source} rule {self.index}{line}"

    @property
    def label(self) -> str:
        """Short form for tables: file name, index and line."""
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{Path(self.source).name} #{self.index}{line}"

    def matches(self, name: str, module: torch.nn.Module) -> bool:
        """True when the dotted `name` and the module's class satisfy every match key."""
        if self.name_pattern is not None and not self.name_pattern.search(name):
            return False
        return self.match_class is None or class_matches(type(module), self.match_class)


@dataclass
class RuleSet:
    """Rules in priority order (ours before an `extends` base), the variables they used, and
    notes about accepted-but-ignored settings (shown by `ktinject inspect`)."""

    rules: list[Rule]
    variables: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def class_matches(cls: type, wanted: str) -> bool:
    """isinstance by name: a short name matches any class in the MRO with that `__name__`, a
    dotted name matches `module.qualname` exactly. No import happens, so matching is safe."""
    for klass in cls.__mro__:
        if "." in wanted:
            if f"{klass.__module__}.{klass.__qualname__}" == wanted:
                return True
        elif klass.__name__ == wanted:
            return True
    return False


def builtin_rules_dir() -> Path:
    """The folder of shipped rule files, from an install or a checkout."""
    try:
        import ktinject.builtin_rules as shipped

        return Path(next(iter(shipped.__path__)))
    except ImportError:
        return Path(__file__).resolve().parent.parent / "rules"


def builtin_rule_files() -> list[Path]:
    return sorted(builtin_rules_dir().glob("*.yaml"))


def rules_for(model_type: str) -> Path | None:
    """The shipped rule file for a model family, if there is one (`llama` -> rules/llama.yaml)."""
    for stem in (model_type, model_type.replace("_", "-")):
        path = builtin_rules_dir() / f"{stem}.yaml"
        if path.is_file():
            return path
    return None


def find_rule_file(spec: str | Path, *, relative_to: Path | None = None) -> Path:
    """Resolve a rule file: a path, a shipped file name (`llama.yaml`) or a stem (`llama`)."""
    names = ", ".join(p.name for p in builtin_rule_files())
    if isinstance(spec, str) and not spec.strip():  # Path("") would be the current directory
        raise RuleError(
            f"Rule file {spec!r} is an empty name; give a path or one of the shipped files: "
            f"{names}."
        )
    candidates = [Path(spec)]
    if relative_to is not None:
        candidates.insert(0, relative_to / spec)
    shipped = builtin_rules_dir()
    candidates += [shipped / str(spec), shipped / f"{spec}.yaml"]
    try:
        for path in candidates:
            if path.is_file():
                return path
        text = "\n" in str(spec)
    except OSError:  # a name longer than a file's can be: YAML text, most likely
        text = True
    if text:
        raise RuleError(
            f"Rule file {str(spec)[:40]!r}... is YAML text, not a file name; give rules in memory "
            "as a dict or list (e.g. yaml.safe_load(text)), or write them to a file."
        )
    if any(path.is_dir() for path in candidates[:-2]):  # the user's paths, not the shipped
        raise RuleError(
            f"Rule file {str(spec)!r} is a directory; give a rule file (.yaml) in it or one of "
            f"the shipped files: {names}."
        )
    raise RuleError(
        f"Rule file {str(spec)!r} does not exist; give a path or one of the shipped files: {names}."
    )


def parse_override(text: str) -> tuple[str, Any]:
    """`gpu=cuda:1` -> ("gpu", "cuda:1"); the value is read as YAML so `threads=8` is an int."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RuleError(f"--set {text!r} is not of the form key=value (e.g. --set gpu=cuda:1).")
    try:
        parsed = yaml.load(value, Loader=RuleLoader) if value else ""
    except (yaml.YAMLError, ValueError, TypeError, AttributeError):  # e.g. `x=!!float abc`
        parsed = value
    if not isinstance(parsed, str | int | float | bool | list | dict | None):
        parsed = value  # dates, sets, bytes: omegaconf cannot hold them; keep the text
    return key.strip(), parsed


def load_rules(
    spec: str | Path | Sequence[Any] | Mapping[str, Any] | RuleSet | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    allow_external_operators: bool = False,
) -> RuleSet:
    """Build a `RuleSet` from a file path / shipped name, an in-memory rule document, or None
    (no rules). `overrides` replace values of the file's `vars:`."""
    if isinstance(spec, RuleSet):
        if overrides:
            raise RuleError("Overrides cannot be applied to an already resolved RuleSet.")
        return spec
    if spec is None:
        if overrides:
            raise RuleError(f"--set {next(iter(overrides))} given but no rule file is used.")
        return RuleSet(rules=[])
    raw_rules: list[_RawRule] = []
    variables: dict[str, Any] = {}
    sources: list[str] = []
    notes: list[str] = []
    if isinstance(spec, str | Path):
        _read_chain(find_rule_file(spec), raw_rules, variables, sources, seen=[])
    else:
        _collect(spec, "<rules>", None, raw_rules, variables, sources, seen=[])
    for key, value in (overrides or {}).items():
        if key not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise RuleError(
                f"--set {key}={value}: the rule file defines no variable {key!r} (its vars: "
                f"{known}); add it under vars: or fix the name."
            )
        variables[key] = _variable_value(key, value)
    rules = [
        _validate(
            raw,
            variables,
            notes,
            overridden=set(overrides or {}),
            allow_external_operators=allow_external_operators,
        )
        for raw in raw_rules
    ]
    return RuleSet(rules=rules, variables=variables, sources=sources, notes=notes)


def _variable_value(key: str, value: Any) -> Any:
    """An override as a value a rule variable can hold (see `_plain`)."""
    return _plain(value, f"--set {key}", "its value")


def _plain(value: Any, where: str, key: str) -> Any:
    """`value` as a rule file could hold it: text, numbers, booleans, None, lists and mappings;
    a device or a path becomes its text (what a file would say). Anything else -- a compiled
    regex, a class, a tensor, from rules written in Python -- is one sentence naming `key`:
    yaml and omegaconf would fail on it deep inside."""
    if isinstance(value, torch.device | PurePath):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v, where, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    hint = ", e.g. 'operators.norm.RMSNorm' as text" if isinstance(value, type) else ""
    raise RuleError(
        f"{where}: {key} is of type {type(value).__name__}, which cannot be a rule value; give "
        f"a str, number, bool, list, dict or None, as a rule file would{hint}."
    )


@dataclass
class _RawRule:
    source: str
    index: int
    line: int | None
    body: Any


def _read_chain(
    path: Path,
    raw_rules: list[_RawRule],
    variables: dict[str, Any],
    sources: list[str],
    seen: list[Path],
) -> None:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(p.name for p in [*seen, resolved])
        raise RuleError(f"{path}: 'extends' forms a cycle ({chain}); remove one of the extends.")
    text = read_text(path, f"Rule file {str(path)!r}", RuleError)
    try:
        document = yaml.load(text, Loader=RuleLoader)
        lines = _rule_lines(yaml.compose(text, Loader=RuleLoader))
    except yaml.YAMLError as exc:
        where, problem = yaml_problem(exc, text)
        at = f":{where[0]}:{where[1]}" if where else ""
        raise RuleError(f"{path}{at}: malformed YAML ({problem}); fix the file there.") from None
    _collect(document, str(path), lines, raw_rules, variables, sources, seen=[*seen, resolved])


def _collect(
    document: Any,
    source: str,
    lines: list[int] | None,
    raw_rules: list[_RawRule],
    variables: dict[str, Any],
    sources: list[str],
    seen: list[Path],
) -> None:
    """Append this document's rules, then its base's (first match wins, so ours come first).
    Our variables override the base's."""
    sources.append(source)
    if document is None:
        document = {}
    if isinstance(document, list | tuple):
        document = {"rules": list(document)}
    if not isinstance(document, dict):
        raise RuleError(
            f"{source}: a rule file must be a mapping with 'rules:' or a list of rules, "
            f"not a {type(document).__name__}."
        )
    _check_keys(document, TOP_KEYS, f"{source}", "top-level key")
    rules = document.get("rules") or []
    if not isinstance(rules, list):
        raise RuleError(f"{source}: 'rules' must be a list of rules, not {type(rules).__name__}.")
    own_vars = document.get("vars") or {}
    if not isinstance(own_vars, dict):
        raise RuleError(f"{source}: 'vars' must be a mapping of names to values.")
    for index, body in enumerate(rules):
        line = lines[index] if lines is not None and index < len(lines) else None
        raw_rules.append(_RawRule(source, index, line, body))
    base = document.get("extends")
    base_vars: dict[str, Any] = {}
    if base is not None:
        here = Path(source).parent if source != "<rules>" else None
        try:
            base_path = find_rule_file(str(base), relative_to=here)
        except RuleError:
            names = ", ".join(p.name for p in builtin_rule_files())
            raise RuleError(
                f"{source}: extends {str(base)!r} names no rule file; give a path relative to "
                f"this file or one of the shipped files: {names}."
            ) from None
        _read_chain(base_path, raw_rules, base_vars, sources, seen)
    variables.update({**base_vars, **own_vars})


def _rule_lines(root: yaml.Node | None) -> list[int] | None:
    """1-based line of each rule item, read from the YAML node tree."""
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if getattr(key, "value", None) == "rules" and isinstance(value, yaml.SequenceNode):
                return [item.start_mark.line + 1 for item in value.value]
        return None
    if isinstance(root, yaml.SequenceNode):
        return [item.start_mark.line + 1 for item in root.value]
    return None


def _check_keys(mapping: Mapping[str, Any], allowed: Sequence[str], where: str, what: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}."
            raise RuleError(f"{where}: unknown {what} {key!r}; {hint}")


def _resolve_vars(body: Any, variables: dict[str, Any], where: str) -> Any:
    """Substitute `${var}`. omegaconf resolvers (`${oc.env:HOME}`, ...) are refused: a rule file
    names modules and operators, it has no business reading the environment."""
    body = _plain(body, where, "")
    variables = {name: _plain(value, where, f"vars.{name}") for name, value in variables.items()}
    for text in (yaml.safe_dump(body), yaml.safe_dump(variables)):
        calls = [name for name in VAR_PATTERN.findall(text) if ":" in name]
        if calls:
            raise RuleError(
                f"{where}: ${{{calls[0]}}} calls a resolver; rule files allow only ${{var}} "
                f"interpolation of their vars: (set values with --set instead)."
            )
    try:
        node = OmegaConf.create({**variables, "__rule__": body})
        return OmegaConf.to_container(node["__rule__"], resolve=True)  # only what it uses
    except OmegaConfBaseException as exc:
        names = VAR_PATTERN.findall(yaml.safe_dump(body))
        unknown = [n for n in names if n not in variables]
        if unknown:
            raise RuleError(
                f"{where}: ${{{unknown[0]}}} names no variable; define it under vars: or pass "
                f"--set {unknown[0]}=VALUE."
            ) from None
        reason = str(exc).splitlines()[0]  # omegaconf appends full_key/object_type lines
        raise RuleError(f"{where}: cannot resolve variables ({reason}); check vars:.") from None


def _validate(
    raw: _RawRule,
    variables: dict[str, Any],
    notes: list[str],
    *,
    overridden: set[str],
    allow_external_operators: bool,
) -> Rule:
    line = f", line {raw.line}" if raw.line is not None else ""
    where = f"{raw.source} rule {raw.index}{line}"
    if not isinstance(raw.body, dict):
        raise RuleError(f"{where}: a rule must be a mapping with 'match' and 'replace'.")
    _check_keys(raw.body, RULE_KEYS, where, "key")
    body = _resolve_vars(raw.body, variables, where)
    match = body.get("match")
    replace = body.get("replace")
    if not isinstance(match, dict) or not match:
        raise RuleError(f"{where}: 'match' must be a mapping with 'name' and/or 'class'.")
    if not isinstance(replace, dict) or "class" not in replace:
        raise RuleError(f"{where}: 'replace' must be a mapping with at least 'class'.")
    _check_keys(match, MATCH_KEYS, where, "match key")
    _check_keys(replace, REPLACE_KEYS, where, "replace key")

    name_pattern = None
    name = match.get("name")
    written_name = _raw_value(raw.body, "match.name")
    if isinstance(written_name, str) and isinstance(name, int | float):
        name = str(name)  # a number from a variable (`--set layer=5` reads 5 as an int)
    if name is not None and not isinstance(name, str):
        origin = _origin(written_name, variables, overridden)
        raise RuleError(
            f"{where}: match.name must be a string (a regex), not {type(name).__name__} "
            f"{name!r}; {origin or f'quote it, e.g. name: {str(name)!r}'}."
        )
    if name is not None:
        try:
            name_pattern = re.compile(name)
        except re.error as exc:
            origin = _origin(written_name, variables, overridden, bad=_not_a_regex)
            raise RuleError(
                f"{where}: match.name {name!r} is not a valid regex ({exc}); {origin or 'fix it'}."
            ) from None
    match_class = match.get("class")
    if match_class is not None and not isinstance(match_class, str):
        raise RuleError(f"{where}: match.class must be a class name string.")

    kwargs = replace.get("kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise RuleError(
            f"{where}: replace.kwargs must be a mapping of keyword arguments, not a "
            f"{type(kwargs).__name__} ({kwargs!r}); write it as kwargs: {{name: value}}."
        )
    odd = [key for key in kwargs if not isinstance(key, str)]
    if odd:
        raise RuleError(
            f"{where}: replace.kwargs key {odd[0]!r} is not a keyword argument name; use a name "
            f"such as threads."
        )
    kwargs = dict(kwargs)
    device_value = replace.get("device")
    generate_device = kwargs.pop("generate_device", None)
    prefill_device = kwargs.pop("prefill_device", None)
    if device_value is None:
        device_value = generate_device
    if prefill_device is not None and prefill_device != device_value:
        notes.append(
            f"{where}: prefill_device {prefill_device!r} is ignored; ktinject runs prefill and "
            f"decode of an operator on one device ({device_value or 'where the module is'})."
        )
    device = None
    if device_value is not None:
        key = "replace.device" if replace.get("device") is not None else GENERATE_DEVICE_KEY
        via = VAR_PATTERN.findall(str(_raw_value(raw.body, key)))
        fix = f"--set {via[0]}=cpu" if via else key
        device = check_device(str(device_value), where=where, fix=fix)

    replace_class = str(replace["class"])
    operator = None
    if replace_class != "default":
        operator = import_operator(
            replace_class, where=where, allow_external=allow_external_operators
        )
    recursive = body.get("recursive", True)
    if not isinstance(recursive, bool):
        raise RuleError(f"{where}: 'recursive' must be true or false, not {recursive!r}.")
    return Rule(
        source=raw.source,
        index=raw.index,
        line=raw.line,
        name_pattern=name_pattern,
        match_class=match_class,
        replace_class=replace_class,
        operator=operator,
        device=device,
        kwargs=kwargs,
        recursive=recursive,
    )


def _raw_value(body: dict[str, Any], key: str) -> Any:
    """The value of a dotted `key` (`replace.device`) as written in the rule, before `${...}` is
    resolved ("" if not a plain key)."""
    value: Any = body
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else value


def _not_a_regex(value: Any) -> bool:
    try:
        re.compile(str(value))
    except re.error:
        return True
    return False


def _origin(
    written: Any,
    variables: Mapping[str, Any],
    overridden: set[str],
    bad: Callable[[Any], bool] | None = None,
) -> str:
    """Where a bad value came from when the rule wrote it as `${var}` ("" when written out): the
    first variable it uses whose value alone is `bad` (else the first), and how to change it."""
    names = [name for name in VAR_PATTERN.findall(str(written)) if name in variables]
    if not names:
        return ""
    name = next((n for n in names if bad is not None and bad(variables[n])), names[0])
    if name in overridden:
        return f"it comes from --set {name}={variables[name]}: fix that value"
    return (
        f"it comes from ${{{name}}} = {variables[name]!r} under vars:; fix it there or pass "
        f"--set {name}=VALUE"
    )


def import_operator(path: str, *, where: str, allow_external: bool) -> type[torch.nn.Module]:
    """Import `replace.class`, enforcing the allow-list unless the caller opted out."""
    module_name, _, class_name = path.rpartition(".")
    if not module_name:  # checked first: a bare name is a typo, not an external operator
        raise RuleError(
            f"{where}: replace.class {path!r} must be a dotted path like "
            f"'operators.mlp.FusedGatedMLP', or 'default'."
        )
    if not allow_external and not path.startswith(ALLOWED_OPERATOR_PREFIXES):
        allowed = ", ".join(p.rstrip(".") for p in ALLOWED_OPERATOR_PREFIXES)
        raise RuleError(
            f"{where}: replace.class {path!r} is outside the allowed packages ({allowed}); pass "
            f"--allow-external-operators (allow_external_operators=True) if you trust it."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuleError(
            f"{where}: replace.class {path!r} cannot be imported ({exc}); check the path."
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise RuleError(
            f"{where}: replace.class {path!r}: module {module_name!r} has no {class_name!r}; "
            f"check the name."
        )
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise RuleError(f"{where}: replace.class {path!r} is not a torch.nn.Module subclass.")
    return cls
