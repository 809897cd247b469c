"""`ktinject bench`: Hugging Face `generate` and ktinject on the same model, in the same run.

Measures prefill and decode throughput at a short and a long context, time to first token, the
first call (warm-up, compilation, graph capture), peak memory and whether the greedy tokens equal
Hugging Face's; prints a table with ratios and writes JSON. See benchmarks/README.md.

Only argparse and the CLI's flag helpers are imported here: the CLI builds every sub-command's
parser at start-up.
"""

from __future__ import annotations

import argparse

from ktinject.cli import add_rule_arguments


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ktinject bench` flags (defaults that depend on the device are filled in later)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--shape",
        default=None,
        help="named random-weight shape, nothing downloaded: smollm2-135m (default), llama3-8b, "
        "qwen3-30b-a3b, tiny",
    )
    source.add_argument(
        "--model",
        default=None,
        metavar="PATH|embedded",
        help="a real model: Hugging Face directory, .gguf file, or 'embedded' (SmolLM2-135M)",
    )
    add_rule_arguments(
        parser,
        "rule file for the ktinject side: path, shipped name, 'auto' (the model family's "
        "file) or 'none'",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if any)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16",
    )
    parser.add_argument("--prompt-len", type=int, default=128, help="short context (default 128)")
    parser.add_argument(
        "--long-context",
        type=int,
        default=None,
        help="prompt length of the long-context runs; 0 skips them (default 1024 CPU, 8192 GPU)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="tokens per generation (default 64 CPU, 256 GPU)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="sequences generated together, each with its own prompt (default 1); rates "
        "count every sequence's tokens",
    )
    parser.add_argument(
        "--baselines",
        default=None,
        help="comma-separated: eager (HF DynamicCache), static-compile (HF StaticCache + "
        "torch.compile); default eager on CPU, eager,static-compile on GPU",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default 2 on CPU)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write all numbers here")
    parser.add_argument(
        "--no-cuda-graph", action="store_true", help="ktinject decodes eagerly on GPU"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="ktinject decodes through torch.compile on CPU (compile time counts as its first "
        "call)",
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; returns the exit code (1 if a system failed)."""
    from ktinject.bench.runner import run

    return run(args)
