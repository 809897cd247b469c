"""The `ktinject` command as a user runs it: answers, tables, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def ktinject(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ktinject", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single `error:` line of a failed command (no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
def test_run_streams_an_answer_and_a_status_line(smollm2) -> None:
    result = ktinject("run", "What is the capital of France?", "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    status = result.stderr.strip().splitlines()[-1]
    for part in ("prompt", "generated", "prefill", "decode", "tok/s"):
        assert part in status


@pytest.mark.slow
def test_run_with_quantized_rules_and_compile_gives_the_same_answer(smollm2) -> None:
    """The CPU fast path end to end: Q4_1 blocks kept from the GGUF, decode compiled."""
    question = ("What is the capital of France?", "--max-new-tokens", "12")
    plain = ktinject("run", *question)
    fast = ktinject("run", *question, "--rules", "llama-cpu-q4", "--compile")
    assert fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout


@pytest.mark.slow
def test_compile_without_a_static_cache_says_it_does_nothing(smollm2) -> None:
    result = ktinject("run", "Hi", "--rules", "none", "--compile", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "note: --compile has no effect here: the rules give no static cache" in result.stderr


@pytest.mark.slow
def test_inspect_prints_the_table_and_exits_zero(smollm2) -> None:
    result = ktinject("inspect")
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.self_attn" in result.stdout
    assert "StaticCacheAttention" in result.stdout and "FusedGatedMLP" in result.stdout
    assert "llama.yaml" in result.stdout


@pytest.mark.slow
def test_inspect_strict_names_the_rule_that_matched_nothing(smollm2, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "extends: llama.yaml\n"
        "rules:\n"
        "  - match: {name: '^model\\.no_such_module$'}\n"
        "    replace: {class: default}\n"
    )
    assert ktinject("inspect", "--rules", str(rules)).returncode == 0
    error = one_error_line(ktinject("inspect", "--rules", str(rules), "--strict"))
    assert "rules.yaml rule 0" in error and "no_such_module" in error and "--strict" in error


@pytest.mark.slow
def test_a_device_that_does_not_exist_is_one_sentence(smollm2, tmp_path: Path) -> None:
    rules = tmp_path / "gpu.yaml"
    rules.write_text(
        "vars: {gpu: 'cuda:3'}\n"
        "rules:\n"
        "  - match: {class: LlamaRMSNorm}\n"
        "    replace: {class: operators.norm.RMSNorm, device: '${gpu}'}\n"
    )
    if __import__("torch").cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    error = one_error_line(ktinject("inspect", "--rules", str(rules)))
    assert "cuda:3" in error and "--set gpu=cpu" in error


@pytest.mark.parametrize(
    "args",
    [["--help"], ["run", "--help"], ["run", "nope/", "hi"], ["chat", "--top-k", "-1"]],
    ids=["help", "run help", "missing path", "bad flag"],
)
def test_help_and_early_errors_do_not_import_torch(args: list[str]) -> None:
    """Importing torch and transformers takes seconds; help and a mistake in the command line
    answer before that."""
    probe = (
        "import sys; from ktinject.cli import main\n"
        f"try: main({args!r})\n"
        "except SystemExit: pass\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.splitlines()[-1] == "[]", result.stderr


def test_a_missing_model_path_is_one_sentence(tmp_path: Path) -> None:
    error = one_error_line(ktinject("run", str(tmp_path / "nope"), "hello"))
    assert "does not exist" in error and "nope" in error


def test_an_unquoted_two_word_prompt_says_to_quote_it() -> None:
    error = one_error_line(ktinject("run", "Hi", "there"))
    assert "got 2 arguments; quote the prompt" in error


def test_a_model_path_without_a_prompt_is_not_answered_as_one(tmp_path: Path) -> None:
    error = one_error_line(ktinject("run", str(tmp_path)))
    assert "which is a model path; give the prompt after it" in error


def test_a_chat_cache_with_no_room_for_a_message_is_refused_at_start(tmp_path: Path) -> None:
    error = one_error_line(ktinject("chat", str(tmp_path / "nope"), "--cache-lens", "40"))
    assert "--max-new-tokens 256 leaves no room for a message in --cache-lens 40" in error


def test_system_with_raw_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    error = one_error_line(ktinject("run", str(tmp_path / "nope"), "hi", "--raw", "--system", "x"))
    assert "--system goes into the chat template, which --raw skips" in error


@pytest.mark.parametrize(
    "command, flag, value",
    [("run", "--top-p", "2"), ("run", "--temperature", "-1"), ("run", "--top-k", "-1")]
    + [("run", "--max-new-tokens", "0"), ("run", "--chunk-size", "0")]
    + [("run", "--cache-lens", "1"), ("chat", "--top-p", "0")]
    + [("run", "--temperature", "nan"), ("run", "--seed", str(2**64))],
)
def test_a_bad_generation_flag_fails_before_the_model_loads(
    tmp_path: Path, command: str, flag: str, value: str
) -> None:
    """The model path does not exist: the flag's error comes first, so no weights were read."""
    words = [str(tmp_path / "nope"), "hello"] if command == "run" else [str(tmp_path / "nope")]
    error = one_error_line(ktinject(command, *words, flag, value, stdin=""))
    assert f"is {value}" in error.replace(".0;", ";") and flag in error


def test_a_malformed_rule_file_names_file_and_line(tmp_path: Path) -> None:
    rules = tmp_path / "bad.yaml"
    rules.write_text("rules:\n  - match: {name: 'x'\n    replace: {class: default}\n")
    error = one_error_line(ktinject("inspect", "--rules", str(rules)))
    assert "bad.yaml:" in error and "malformed YAML" in error


@pytest.mark.slow
def test_a_prompt_longer_than_the_cache_is_one_sentence(smollm2) -> None:
    error = one_error_line(ktinject("run", "word " * 300, "--cache-lens", "64"))
    assert "64 positions" in error and "--cache-lens" in error


def test_a_family_without_rules_runs_unpatched_within_its_window(tmp_path: Path) -> None:
    """GPT-2 (learned positions, no shipped rule file): run says it runs unpatched, a cache past
    its 64 positions is cut to them, and a request past them is one sentence (it was an
    IndexError inside the forward)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=256)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    words = Tokenizer(WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    words.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0").save_pretrained(tmp_path)
    common = ("run", str(tmp_path), "t1 t2 t3", "--raw", "--cache-lens", "300")
    result = ktinject(*common, "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "No rule file applies to 'gpt2'; the model runs unpatched" in result.stderr
    assert "--cache-lens 300 is past the model's context window" in result.stderr
    error = one_error_line(ktinject(*common, "--max-new-tokens", "100"))
    assert "the model's context window is 64 positions" in error
