"""`ktinject run | chat | serve | inspect | bench` — one entry point.

Every user mistake surfaces as one `error:` line and exit code 2; nothing here prints a traceback
for a `KtinjectError`.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from ktinject.errors import KtinjectError

EXIT_USAGE = 2


def add_rule_arguments(parser: argparse.ArgumentParser, rules_help: str) -> None:
    """`--rules` and `--set`, read back by `rules_arg` and `overrides_arg` (`bench` too)."""
    parser.add_argument("--rules", default="auto", help=rules_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a rule-file variable, e.g. --set gpu=cuda:1 (repeatable)",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every command that loads a model shares."""
    add_rule_arguments(
        parser,
        "rule file path or shipped name (llama, qwen3-moe, ...); 'auto' picks the model "
        "family's file, 'none' runs the model unpatched (default: auto)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if any)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16",
    )
    add_rule_check_arguments(parser)


def add_rule_check_arguments(parser: argparse.ArgumentParser, default: bool | None = False) -> None:
    """`--strict` and `--allow-external-operators` (`serve` too: its default None leaves a
    --config file's value in force when the flag is not given)."""
    parser.add_argument(
        "--strict", action="store_true", default=default, help="fail when a rule matches no module"
    )
    parser.add_argument(
        "--allow-external-operators",
        action="store_true",
        default=default,
        help="let replace.class import from packages other than operators/ktinject/torch.nn/"
        "transformers",
    )


def rules_arg(value: str) -> str | None:
    return None if value.lower() == "none" else value


def overrides_arg(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` flags as the rule-variable overrides `optimize` / `load` take."""
    from ktinject.rules import parse_override

    return dict(parse_override(item) for item in items)


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "rules": rules_arg(args.rules),
        "overrides": overrides_arg(args.overrides),
        "device": args.device,
        "dtype": args.dtype,
        "strict": args.strict,
        "allow_external_operators": args.allow_external_operators,
    }


COMPILE_HELP = (
    "CPU: decode through torch.compile (the first run compiles for a minute or two; inductor "
    "caches the kernels on disk, later runs take seconds)"
)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--system", default=None, help="system message for the chat template")
    parser.add_argument(
        "--cache-lens",
        type=int,
        default=None,
        help="KV cache positions per sequence (default: sized per call to prompt + new tokens)",
    )
    parser.add_argument("--chunk-size", type=int, default=8192, help="prefill chunk length")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on GPU")
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def sampling_params(args: argparse.Namespace) -> Any:
    from ktinject.settings import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=list(args.stop),
    )


def load_for(args: argparse.Namespace, model: str | None) -> Any:
    """The model for `run` / `chat`, after the flags that need no model are checked: a bad
    --top-p, --chunk-size or model path fails at once, before torch is even imported."""
    from ktinject.settings import check_cache_settings
    from ktinject.sources import resolve_source

    sampling_params(args)
    check_cache_settings(args.cache_lens, args.chunk_size)
    resolve_source(model)
    from ktinject.loading import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmatched rules are printed from the report below
        loaded = load(model, **model_kwargs(args))
    for where in loaded.report.unmatched:
        print(f"warning: {where} matched no module", file=sys.stderr)
    if loaded.rules is None and rules_arg(args.rules) is not None:  # auto found no file
        print(f"note: {unpatched(loaded.model.config.model_type)}", file=sys.stderr)
    return loaded


def unpatched(model_type: str) -> str:
    """What `--rules auto` means for a family without a shipped rule file."""
    from ktinject.rules import builtin_rule_files

    names = [p.stem for p in builtin_rule_files()]
    close = difflib.get_close_matches(model_type.replace("_", "-"), names, n=1, cutoff=0.3)
    hint = f"closest shipped file: {close[0]}.yaml" if close else f"shipped: {', '.join(names)}"
    return f"No rule file applies to {model_type!r}; the model runs unpatched ({hint})."


def build_engine(args: argparse.Namespace, loaded: Any, *, prompt_tokens: int | None = None) -> Any:
    """The engine for `run` / `chat`. `prompt_tokens` (run): check that prompt and size a
    local-mode cache for it before warming up, so a prompt that cannot fit is refused before
    `--compile` spends a minute or two compiling."""
    from ktinject.engine import Engine

    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        cache_lens=args.cache_lens,
        chunk_size=args.chunk_size,
        cuda_graph=not args.no_cuda_graph,
        compile=args.compile,
    )
    for note in engine.notes():
        print(f"note: {note}", file=sys.stderr)
    if prompt_tokens is not None:
        engine.reserve(prompt_tokens, args.max_new_tokens)
    if engine.compiled is not None:  # compile now, so the status line times generation only
        print("compiling the decode step (torch.compile)...", end="", file=sys.stderr, flush=True)
        engine.warm_up()
        print(f" {engine.compiled.compile_s:.1f} s", file=sys.stderr)
    return engine


def status_line(stats: Any, cache: tuple[int, int | None] | None = None) -> str:
    parts = [
        f"prompt {stats.prompt_tokens:,} tok",
        f"prefilled {stats.prompt_tokens - stats.cached_tokens:,}",
        f"generated {stats.generated_tokens:,} tok",
        f"prefill {stats.prefill_tok_s:,.1f} tok/s",
        f"decode {stats.decode_tok_s:,.1f} tok/s",
    ]
    if cache is not None and cache[1] is not None:
        parts.append(f"cache {cache[0]:,}/{cache[1]:,}")
    if stats.setup_s >= 0.05:
        parts.append(f"warm-up {stats.setup_s:.1f} s, not in the rates")
    return "[" + " · ".join(parts) + "]"


# -- commands ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    model, prompt = model_and_prompt(args.words)
    if args.raw and args.system:
        raise KtinjectError(
            "--system goes into the chat template, which --raw skips; drop one of the two."
        )
    loaded = load_for(args, model)
    from ktinject.chat import chat_prompt_ids

    tokenizer = loaded.tokenizer
    if args.raw or not getattr(tokenizer, "chat_template", None):
        if args.system:
            print("note: the tokenizer has no chat template; --system is not used", file=sys.stderr)
        ids = tokenizer(prompt)["input_ids"]
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = chat_prompt_ids(tokenizer, [*messages, {"role": "user", "content": prompt}])
    engine = build_engine(args, loaded, prompt_tokens=len(ids))
    generation = engine.generate(ids, sampling_params(args))
    for piece in generation:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(status_line(generation.stats), file=sys.stderr)
    return 0


def model_and_prompt(words: list[str]) -> tuple[str | None, str]:
    """`run`'s [MODEL] PROMPT, refusing what is surely a mistake: an unquoted prompt of several
    words, or a model path given without a prompt (it would be answered as the prompt)."""
    first = words[0]
    looks_like_path = "/" in first or os.sep in first or first.lower().endswith(".gguf")
    if len(words) > 2 or (len(words) == 2 and not looks_like_path and not os.path.exists(first)):
        # `ktinject run Hi there`: a prompt of several words, not a model called "Hi"
        raise KtinjectError(
            f"run takes [MODEL] PROMPT, got {len(words)} arguments; quote the prompt."
        )
    if len(words) == 1 and looks_like_path and os.path.exists(first):
        raise KtinjectError(
            f"run takes [MODEL] PROMPT and got only {first!r}, which is a model path; give the "
            f"prompt after it."
        )
    return (words[0], words[1]) if len(words) == 2 else (None, words[0])


def cmd_chat(args: argparse.Namespace) -> int:
    if args.cache_lens is not None and args.max_new_tokens >= args.cache_lens:
        raise KtinjectError(  # every turn would be refused
            f"--max-new-tokens {args.max_new_tokens:,} leaves no room for a message in "
            f"--cache-lens {args.cache_lens:,}; lower --max-new-tokens or raise --cache-lens."
        )
    loaded = load_for(args, args.model)
    from ktinject.chat import MULTILINE, ChatSession, read_message
    from ktinject.errors import ContextLengthError

    engine = build_engine(args, loaded)
    session = ChatSession(engine, sampling_params(args), system=args.system)
    mode = f"cache {engine.cache_lens:,} positions" if args.cache_lens else "local mode"
    commands = (
        f"/reset to start over, /exit to quit, {MULTILINE} to begin and end a message of several "
        "lines"
    )
    print(f"ktinject chat ({loaded.source.label}, {mode}); {commands}.")
    while True:
        text = read_message(input)
        if text is None:
            print()
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation reset)")
            continue
        if text.startswith("/") and " " not in text:  # e.g. /help, or a typo of a command
            print(f"(unknown command {text}; {commands})")
            continue
        try:
            for piece in session.turn(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextLengthError as exc:
            print(f"error: {exc} Type /reset to start a new conversation.")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the answer; at the prompt it quits
            session.abandon_turn()
            print("\n(answer stopped; this turn is not kept)")
            continue
        print()
        print(status_line(session.last.stats, session.cache_usage()))


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ktinject.loading import plan

    kwargs = model_kwargs(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planned = plan(args.model, **kwargs)
    console = Console(width=max(Console().width, 140))
    report = planned.report
    model_type = planned.model.config.model_type
    console.print(f"model: {planned.source.label} ({model_type}), rules: {planned.rules or 'none'}")
    table = Table("module", "rule", "original", "operator", "device")
    for name, rule, original, operator, device in report.rows():
        table.add_row(
            name, rule, original, operator, device if device != "-" else str(planned.device)
        )
    console.print(table)
    console.print(f"{len(report.replacements)} module(s) replaced or placed.")
    for note in report.notes:
        console.print(f"note: {note}")
    for where in report.unmatched:
        console.print(f"[yellow]warning:[/] {where} matched no module")
    if planned.rules is None:
        console.print(unpatched(model_type))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ktinject.server import run_serve

    return run_serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from ktinject.bench import run_bench

    return run_bench(args)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktinject",
        description="Run Hugging Face causal LMs with injected fast operators.",
        allow_abbrev=False,  # here and in each subcommand: a partial flag is an error, not a guess
    )
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False),
    )

    run = commands.add_parser("run", help="generate a completion for one prompt")
    run.add_argument("words", nargs="+", metavar="[MODEL] PROMPT")
    run.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_model_arguments(run)
    add_generation_arguments(run)
    run.set_defaults(handler=cmd_run)

    chat = commands.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("model", nargs="?", default=None)
    add_model_arguments(chat)
    add_generation_arguments(chat)
    chat.set_defaults(handler=cmd_chat)

    inspect = commands.add_parser("inspect", help="show which module each rule replaces")
    inspect.add_argument("model", nargs="?", default=None)
    add_model_arguments(inspect)
    inspect.set_defaults(handler=cmd_inspect)

    chosen = next(
        (a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None
    )
    for name, help_text, module, adder, handler in LAZY_COMMANDS:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(handler=handler)
        if name == chosen:  # import the server / bench stack only when it is used
            getattr(importlib.import_module(module), adder)(sub)
    return parser


LAZY_COMMANDS: list[tuple[str, str, str, str, Callable[[argparse.Namespace], int]]] = [
    ("serve", "OpenAI-compatible HTTP server", "ktinject.server", "add_serve_arguments", cmd_serve),
    (
        "bench",
        "benchmark against Hugging Face generate",
        "ktinject.bench",
        "add_bench_arguments",
        cmd_bench,
    ),
]


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()  # before `serve` or `bench` imports their stack in build_parser
    args = build_parser(argv).parse_args(argv)
    try:
        return args.handler(args)
    except KtinjectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _quiet_libraries() -> None:
    """transformers' advisory warnings are noise on a CLI; errors still surface. Said through
    its environment variable (unless the user set one), which it reads when first imported:
    importing it here would cost a flag error or `--help` over a second."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


if __name__ == "__main__":
    sys.exit(main())
