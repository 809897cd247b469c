"""`ktinject bench` end to end on the tiny shape: the JSON has every number, and in fp32 the
ktinject tokens equal Hugging Face's. Timings are never asserted (they depend on the machine)."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from ktinject.bench import add_bench_arguments, run_bench, runner
from ktinject.errors import KtinjectError

METRICS = {
    "prefill_tok_s",
    "ttft_ms",
    "decode_tok_s",
    "long_prefill_tok_s",
    "long_ttft_ms",
    "long_decode_tok_s",
    "first_call_s",
    "steady_call_s",
    "peak_memory_gib",
}


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(flags))


def test_tiny_bench_writes_json_and_matches_hf(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = parse(
        "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-len", "8",
        "--long-context", "40", "--new-tokens", "6", "--repeats", "2", "--json", str(out),
    )  # fmt: skip

    assert run_bench(args) == 0

    result = json.loads(out.read_text())
    assert {"machine", "model", "settings", "reference", "systems", "ratios"} <= set(result)
    assert {"date", "cpu", "cpu_capability", "torch", "transformers"} <= set(result["machine"])
    assert result["machine"]["native_operators"] in ("C++", "Python", None)
    assert result["settings"]["dtype"] == "float32"
    assert result["settings"]["cache_lens"] >= 40 + 6
    assert result["model"]["rules"].endswith("llama.yaml")
    assert result["model"]["replaced_modules"] > 0
    assert set(result["systems"]) == {"hf-eager", "ktinject"}
    assert result["reference"] == "hf-eager"
    for system in result["systems"].values():
        assert system["error"] is None
        assert set(system["metrics"]) == METRICS
        assert all(value is not None for value in system["metrics"].values())
        assert len(system["samples"]["short"]) == len(system["samples"]["long"]) == 2
        assert len(system["tokens"]["short"]) == len(system["tokens"]["long"]) == 6
    kt = result["systems"]["ktinject"]
    assert kt["tokens"] == result["systems"]["hf-eager"]["tokens"]
    assert kt["matches_reference"] == {
        "short": {"equal": True, "first_mismatch": None},
        "long": {"equal": True, "first_mismatch": None},
    }
    assert set(result["ratios"]["ktinject/hf-eager"]) == METRICS
    table = capsys.readouterr().out
    machine = result["machine"]
    assert f"{machine['cpu']} {machine['cpu_capability']} (cpu, " in table
    assert "decode tok/s @8" in table and "decode tok/s @40" in table
    assert "tokens equal hf-eager @40" in table
    if result["machine"]["native_operators"] == "C++":  # every tiny layer has its CPU kernels
        assert kt["decode_path"] == "eager, 2 of 2 decoder layers in one C++ call each"
        assert f"ktinject decode path: {kt['decode_path']}" in table


def test_long_context_can_be_skipped(capsys):
    args = parse(
        "--shape", "tiny", "--device", "cpu", "--prompt-len", "4", "--long-context", "0",
        "--new-tokens", "3", "--repeats", "1",
    )  # fmt: skip

    assert run_bench(args) == 0

    table = capsys.readouterr().out
    assert "decode tok/s @4" in table and "@0" not in table


def test_a_batch_of_sequences_matches_hf_row_by_row(tmp_path, capsys):
    """--batch 3: three prompts generated together (HF: one batched `generate`; ktinject: three
    slots decoded as one batch); every row's greedy tokens equal, rates count all rows."""
    out = tmp_path / "bench.json"
    args = parse(
        "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-len", "8",
        "--long-context", "0", "--new-tokens", "5", "--repeats", "1", "--batch", "3",
        "--json", str(out),
    )  # fmt: skip

    assert run_bench(args) == 0

    result = json.loads(out.read_text())
    assert result["settings"]["batch"] == 3
    hf, kt = result["systems"]["hf-eager"], result["systems"]["ktinject"]
    assert len(hf["tokens"]["short"]) == 3 * 5
    assert kt["tokens"]["short"] == hf["tokens"]["short"]
    samples = kt["samples"]["short"]
    assert kt["metrics"]["prefill_tok_s"] == pytest.approx(3 * 8 / samples[0]["ttft_s"])
    assert "batch 3 (rates count all sequences)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--new-tokens", "1"], "--new-tokens is 1"),
        (["--batch", "0"], "--batch is 0"),
        (["--baselines", "eager,fast"], "--baselines 'eager,fast'"),
        (["--shape", "llama-9000"], "--shape 'llama-9000' is unknown"),
        (["--long-context", "5000"], "max_position_embeddings"),
        (["--threads", "0"], "--threads is 0"),
        (["--device", "meta"], "--device: 'meta' holds no weights"),
    ],
)
def test_bad_flags_fail_in_one_sentence(flags, message):
    args = parse("--shape", "tiny", "--device", "cpu", *flags)
    with pytest.raises(KtinjectError, match=message):
        run_bench(args)


def test_a_long_prompt_len_names_that_flag():
    """Without long-context runs the cache is sized by --prompt-len: that is the flag to lower."""
    args = parse(
        "--shape", "tiny", "--device", "cpu", "--prompt-len", "5000", "--long-context", "0"
    )
    with pytest.raises(KtinjectError, match=r"--prompt-len 5000 .*; lower --prompt-len\.$"):
        run_bench(args)


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_an_unusable_json_path_fails_before_anything_runs(tmp_path, monkeypatch, where):
    def no_models(*args, **kwargs):
        raise AssertionError("the models were built")

    monkeypatch.setattr(runner, "_open_models", no_models)
    blocker = tmp_path / "file"
    blocker.write_text("")
    path, message = {
        "directory": (tmp_path, f"--json {tmp_path} is a directory; give a file path"),
        "under a file": (blocker / "bench.json", f"{blocker} is a file, not a directory"),
    }[where]
    with pytest.raises(KtinjectError, match=re.escape(message)):
        run_bench(parse("--shape", "tiny", "--device", "cpu", "--json", str(path)))


def test_rule_variables_are_set_from_the_command_line(tmp_path):
    """`--set` reaches the ktinject side's rule file (and the JSON says what was set)."""
    rules = tmp_path / "norms.yaml"
    rules.write_text(
        "extends: llama.yaml\n"
        "vars: {norm_device: meta}\n"
        "rules:\n"
        "  - match: {class: LlamaRMSNorm}\n"
        "    replace: {class: operators.norm.RMSNorm, device: '${norm_device}'}\n"
    )
    out = tmp_path / "bench.json"
    args = parse(
        "--shape", "tiny", "--device", "cpu", "--prompt-len", "4", "--long-context", "0",
        "--new-tokens", "3", "--repeats", "1", "--rules", str(rules), "--set", "norm_device=cpu",
        "--json", str(out),
    )  # fmt: skip

    assert run_bench(args) == 0
    model = json.loads(out.read_text())["model"]
    assert model["rule_overrides"] == {"norm_device": "cpu"} and model["replaced_modules"] > 0
    with pytest.raises(KtinjectError, match="defines no variable 'nope'"):
        run_bench(parse("--shape", "tiny", "--device", "cpu", "--set", "nope=1"))
