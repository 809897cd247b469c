"""`ktinject serve`: its flags, the optional YAML config, and start-up (load, engine, uvicorn).

Imported by the CLI whenever it builds its parser, so nothing heavy (torch, FastAPI) is imported
at module level here.
"""

from __future__ import annotations

import argparse
import difflib
import io
import ipaddress
import socket
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ktinject.errors import KtinjectError

DEFAULT_CHUNK_SIZE = 512  # per scheduler step: small enough that a long prefill barely stalls


@dataclass
class ServeOptions:
    """Every serve setting; a `--config` YAML file uses these names (`-` or `_`)."""

    model: str | None = None
    rules: str = "auto"
    set: list[str] = field(default_factory=list)
    device: str | None = None
    dtype: str = "auto"
    strict: bool = False
    allow_external_operators: bool = False
    cache_lens: int = 4096
    max_batch_size: int = 4
    max_new_tokens: int = 1024
    chunk_size: int = DEFAULT_CHUNK_SIZE
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    strict_context: bool = False
    no_prefix_reuse: bool = False
    no_cuda_graph: bool = False
    compile: bool = False


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag is None when not given (store_true flags too), so a --config file can fill
    it; the real defaults are those of `ServeOptions`, shown in the help."""
    from ktinject.cli import add_rule_check_arguments

    d = ServeOptions()
    parser.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file with any of these settings; flags given here win",
    )
    parser.add_argument(
        "--rules",
        help=f"rule file or shipped name; 'none' runs unpatched ({d.rules})",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a rule-file variable (repeatable)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if any)")
    parser.add_argument("--dtype", help=f"auto, float32, bfloat16 ({d.dtype})")
    add_rule_check_arguments(parser, default=None)
    parser.add_argument(
        "--cache-lens",
        type=int,
        metavar="N",
        help=f"KV positions per slot = longest conversation ({d.cache_lens})",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        metavar="B",
        help=f"cache slots = requests decoded together ({d.max_batch_size})",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="M",
        help=f"max_tokens when a request gives none ({d.max_new_tokens})",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        metavar="C",
        help=f"prompt tokens prefilled per scheduler step ({d.chunk_size})",
    )
    parser.add_argument("--host", help=f"interface to bind ({d.host})")
    parser.add_argument("--port", type=int, help=f"port ({d.port})")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health and /metrics",
    )
    parser.add_argument(
        "--strict-context",
        action="store_true",
        default=None,
        help="reject max_tokens that do not fit instead of clamping them",
    )
    parser.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        default=None,
        help="always prefill the whole prompt (no conversation-history reuse)",
    )
    parser.add_argument(
        "--no-cuda-graph", action="store_true", default=None, help="decode eagerly on GPU"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="CPU: decode through torch.compile, compiled at start-up (a minute or two the first "
        "time; inductor caches the kernels on disk)",
    )


def resolve_options(args: argparse.Namespace) -> ServeOptions:
    """`ServeOptions` defaults, then the --config file, then the flags given. `--set` values
    from the file and the command line both apply (the command line's last)."""
    options, from_file = ServeOptions(), set()
    if args.config is not None:
        options, from_file = _read_config(args.config)
    given = {f.name: getattr(args, f.name, None) for f in fields(ServeOptions)}
    given = {name: value for name, value in given.items() if value is not None}
    if "set" in given:
        given["set"] = [*options.set, *given["set"]]
    options = replace(options, **given)  # flags as typed, never read as OmegaConf `${...}`
    _check(options, from_file - given.keys(), args.config)
    return options


_KINDS = {"int": "an integer", "bool": "true or false", "list[str]": "a list of KEY=VALUE strings"}


def _read_config(path: str) -> tuple[ServeOptions, set[str]]:
    """The --config file over `ServeOptions` defaults (OmegaConf converts and resolves its
    `${...}`), and the names of the settings it gave. Every mistake names the file and key."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ktinject.yaml_files import read_text, yaml_problem

    text = read_text(Path(path), f"--config {path}")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(io.StringIO(text)))
    except yaml.YAMLError as exc:
        where, problem = yaml_problem(exc, text)
        at = f" line {where[0]}, column {where[1]}" if where else ""
        raise KtinjectError(
            f"--config {path}{at}: malformed YAML ({problem}); fix the file there."
        ) from None
    except (OSError, OmegaConfBaseException):  # a lone number, a null key...
        loaded = None
    if not isinstance(loaded, dict):
        raise KtinjectError(f"--config {path}: expected a mapping of settings (KEY: VALUE lines).")
    names = [f.name for f in fields(ServeOptions)]
    kinds = {f.name: _KINDS.get(str(f.type), "a string") for f in fields(ServeOptions)}
    merged, given = OmegaConf.structured(ServeOptions), set()
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        given.add(name)
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (closest: {close[0]})" if close else ""
            raise KtinjectError(
                f"--config {path}: {str(key)!r} is not a setting{hint}; valid keys: "
                f"{', '.join(names)}."
            )
        try:
            merged = OmegaConf.merge(merged, {name: value})
        except (OmegaConfBaseException, TypeError):  # TypeError: a mapping given for a list
            shown = "empty" if value is None else repr(value)
            raise KtinjectError(
                f"--config {path}: {name} is {shown}; it must be {kinds[name]}."
            ) from None
    try:
        options = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:  # a `${...}` that does not resolve to a valid value
        problem = str(exc).splitlines()[0]
        raise KtinjectError(
            f"--config {path}: {exc.full_key} cannot be resolved ({problem}); fix the file there."
        ) from None
    return options, given


def _check(options: ServeOptions, from_file: set[str], config: str | None) -> None:
    """Limits, each named by its flag, or by the --config key (and flag) it came from."""

    def setting(name: str) -> str:
        flag = "--" + name.replace("_", "-")
        return f"--config {config}: {name} ({flag})" if name in from_file else flag

    for name in ("max_batch_size", "max_new_tokens", "chunk_size"):
        value = getattr(options, name)
        if value < 1:
            raise KtinjectError(f"{setting(name)} is {value}; it must be at least 1.")
    if options.cache_lens < 2:
        raise KtinjectError(
            f"{setting('cache_lens')} is {options.cache_lens}; it must be at least 2."
        )
    if not 0 <= options.port <= 65535:
        raise KtinjectError(f"{setting('port')} is {options.port}; it must be in 0..65535.")
    if options.api_key is not None and not options.api_key.strip():  # "" would disable auth
        leave = "the key" if "api_key" in from_file else "the flag"
        raise KtinjectError(
            f"{setting('api_key')} is empty; give a key, or leave {leave} out to serve without one."
        )


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, build the engine and the app, and serve until interrupted."""
    options = resolve_options(args)
    with bind(options.host, options.port) as listener:  # a busy port fails now, not after loading
        return _serve(options, listener)


def _serve(options: ServeOptions, listener: socket.socket) -> int:
    import uvicorn

    from ktinject.cli import overrides_arg, rules_arg
    from ktinject.engine import Engine
    from ktinject.loading import load
    from ktinject.server.app import create_app
    from ktinject.server.config import ServeConfig

    loaded = load(
        options.model,
        rules=rules_arg(options.rules),
        overrides=overrides_arg(options.set),
        device=options.device,
        dtype=options.dtype,
        strict=bool(options.strict),
        allow_external_operators=bool(options.allow_external_operators),
    )
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        cache_lens=options.cache_lens,
        num_slots=options.max_batch_size,
        chunk_size=options.chunk_size,
        cuda_graph=not options.no_cuda_graph,
        compile=bool(options.compile),
    )
    for note in engine.notes():
        print(f"note: {note}", file=sys.stderr)
    config = ServeConfig(
        model_name=Path(loaded.source.label).name,
        max_new_tokens=options.max_new_tokens,
        strict_context=bool(options.strict_context),
        prefix_reuse=not options.no_prefix_reuse,
        api_key=options.api_key,
    )
    app = create_app(engine, loaded.tokenizer, config)
    if options.api_key is None and not _is_loopback(options.host):
        print(
            f"warning: serving on {options.host} without --api-key; anyone who can reach "
            f"this port can use the model.",
            file=sys.stderr,
        )
    port = listener.getsockname()[1]  # the one the system chose for --port 0
    host = f"[{options.host}]" if ":" in options.host else options.host  # IPv6 in a URL
    print(
        f"ktinject: {config.model_name} on {loaded.device}, {engine.num_slots} slot(s) x "
        f"{engine.cache_lens:,} tokens; OpenAI API at http://{host}:{port}/v1",
        file=sys.stderr,
    )
    if engine.compiled is not None:  # the port opens only after warm-up: say why it waits
        print(
            "ktinject: compiling the decode step before serving (the first time a minute or two "
            "for one row and as much for several; inductor keeps the kernels on disk)...",
            file=sys.stderr,
        )
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    server.run(sockets=[listener])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before the model loads: loading (and `--compile`) can take
    minutes, and only then would uvicorn find the port taken. uvicorn listens on it later."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise KtinjectError(
            f"--host {host!r} does not resolve to an address ({exc.strerror}); use e.g. "
            "127.0.0.1 or 0.0.0.0 (--host)."
        ) from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise KtinjectError(
            f"Cannot serve on {host}:{port} ({exc.strerror}); choose another --port or "
            "--host, or stop what is using it."
        ) from None
    return listener


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
