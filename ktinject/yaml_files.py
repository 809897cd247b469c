"""The YAML files users write (rule files, `serve --config`): reading one, and saying where it
is malformed, in the words of one sentence each. Light on purpose: `serve` checks its --config
file before torch is imported."""

from __future__ import annotations

from pathlib import Path

import yaml

from ktinject.errors import KtinjectError


def read_text(path: Path, name: str, error: type[KtinjectError] = KtinjectError) -> str:
    """`path`'s text; a file that cannot be read or is not UTF-8 raises `error`, whose sentence
    starts with `name` ("Rule file 'x.yaml'", "--config x.yaml")."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{name} cannot be read: {exc.strerror}.") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{name} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); save "
            f"the file as UTF-8."
        ) from None


def yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[tuple[int, int] | None, str]:
    """(line, column), both from 1, where `text` is malformed, and what is wrong there. A
    bracket or quote never closed is reported at its opening: PyYAML finds it missing at the
    end of the file, past the real mistake."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    opened = getattr(exc, "context_mark", None)
    if mark is not None and opened is not None and mark.index >= len(text.rstrip()):
        mark, problem = opened, f"{exc.context}: {problem}"
    return ((mark.line + 1, mark.column + 1) if mark is not None else None), problem
