"""The ``erllama-py`` command line.

::

    erllama-py serve [--config sys.yaml] [--host H] [--port P]   the OpenAI-compatible HTTP server
    erllama-py serve --ray [--address auto] [--replicas N]       the same, on Ray Serve replicas
    erllama-py run [--config sys.yaml] [--once]    start the runtime, print its tree, serve prompts
    erllama-py daemon start|stop|status|restart|logs   the server in the background
    erllama-py models | complete | chat | cache | tree | repl   clients of the running daemon
    erllama-py status [--url URL]                  the replicas of a Ray Serve deployment
    erllama-py check-config [--config sys.yaml]    validate a configuration
    erllama-py fetch-default-model                 assemble gemma-3-270m, print its path
    erllama-py make-test-model PATH                write a tiny random-weight GGUF for tests
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from erllama_py.config import load_config
from erllama_py.daemon.commands import add_commands
from erllama_py.errors import ErllamaError
from erllama_py.model.catalog import KNOWN_MODELS, resolve_model
from erllama_py.model.testmodel import main_make_test_model
from erllama_py.results import Delta
from erllama_py.runtime import Runtime, start
from erllama_py.treeview import render_tree

__all__ = ["main"]

DEFAULT_CONFIG = "sys.yaml"


def _config_path(value: str | None) -> Path | None:
    if value is not None:
        return Path(value)
    default = Path(DEFAULT_CONFIG)
    return default if default.exists() else None


def _print_tree(rt: Runtime, console: Console) -> None:
    console.print(render_tree(rt.tree()))
    for info in rt.models():
        console.print(
            f"model [bold]{info.name}[/bold]: {info.description} ({info.quant}), "
            f"n_ctx {info.n_ctx}, worker pid {info.worker.pid}, tier {info.tier}"
        )


def _serve_prompts(rt: Runtime, console: Console) -> None:
    names = [m.name for m in rt.models()]
    if not names:
        console.print("no model loaded (add one under models: in sys.yaml)")
        return
    model = names[0]
    console.print(f"type a prompt for [bold]{model}[/bold] (empty line or Ctrl-D to quit)")
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            return
        if not prompt.strip():
            return
        try:
            for event in rt.stream(model, prompt, max_tokens=64):
                if isinstance(event, Delta):
                    console.print(event.text, end="", markup=False, highlight=False)
                else:
                    result = event.completion
                    usage = result.usage
                    console.print(
                        f"\n[dim]{result.finish_reason}; {usage.prompt_tokens} prompt tokens "
                        f"({usage.cached_tokens} from cache, {result.cache.kind}), "
                        f"ttft {result.timings.ttft_ms} ms[/dim]"
                    )
        except ErllamaError as exc:
            console.print(f"[red]{type(exc).__name__}: {exc}[/red]")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def cmd_run(args: argparse.Namespace) -> int:
    console = Console()
    config = load_config(_config_path(args.config))
    console.print("starting erllama-py ...")
    with start(config) as rt:
        _print_tree(rt, console)
        if args.once:
            return 0
        if sys.stdin.isatty():
            _serve_prompts(rt, console)
        else:
            console.print("runtime up; Ctrl-C or SIGTERM stops it")
            _wait_for_signal()
        console.print("stopping (saving what is in flight) ...")
    return 0


def cmd_serve_ray(args: argparse.Namespace) -> int:
    try:
        from erllama_py.ray import serve_on_ray  # noqa: PLC0415 - the optional extra
    except ImportError as exc:
        print(f"erllama-py: --ray needs the ray extra (pip install 'erllama-py[ray]'): {exc}",
              file=sys.stderr)  # fmt: skip
        return 2
    config = load_config(_config_path(args.config))
    err = Console(stderr=True)
    err.print("deploying erllama-py on Ray Serve ...")
    serving = serve_on_ray(config, address=args.address, replicas=args.replicas,
                           host=args.host, port=args.port)  # fmt: skip
    print(f"erllama-py serving on Ray Serve at {serving.url} (OpenAI API at {serving.url}/v1, "
          f"replicas at {serving.url}/ray/status)", flush=True)  # fmt: skip
    _wait_for_signal()
    err.print("stopping ...")
    serving.stop()
    err.print("stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.ray:
        return cmd_serve_ray(args)
    from erllama_py.server.serve import start_serving  # noqa: PLC0415 - the server's imports

    if args.daemon:
        from erllama_py.daemon.service import run_daemon  # noqa: PLC0415

        return run_daemon(_config_path(args.config), host=args.host, port=args.port)
    config = load_config(_config_path(args.config))
    err = Console(stderr=True)

    def listening(url: str) -> None:
        err.print(f"erllama-py listening on [bold]{url}[/bold]; loading models ...")

    serving = start_serving(config, host=args.host, port=args.port, on_listening=listening)
    model = config.models[0].name if config.models else "MODEL"
    print(f"erllama-py serving on {serving.url} (OpenAI API at {serving.url}/v1)", flush=True)
    print(
        f"try: curl {serving.url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"""-d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'""",
        flush=True,
    )
    try:
        serving.wait_for_signal(lambda sig: err.print(f"{signal.Signals(sig).name}: stopping ..."))
    finally:
        serving.stop()
    err.print("stopped")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args.config))
    print(json.dumps({"models": [m.name for m in config.models],
                      "tiers": [t.name for t in config.cache.tiers]}))  # fmt: skip
    return 0


def cmd_fetch_default_model(_args: argparse.Namespace) -> int:
    for name in KNOWN_MODELS:
        print(resolve_model(name))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erllama-py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (foreground)")
    serve.add_argument("--config", help=f"sys.yaml path (default ./{DEFAULT_CONFIG} if present)")
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port (default: server.port; 0 picks one)")
    serve.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--ray", action="store_true", help="serve on Ray Serve replicas (ray extra)")
    serve.add_argument(
        "--address", help="with --ray: a Ray cluster to join ('auto'); default ray.address"
    )
    serve.add_argument("--replicas", type=int, help="with --ray: replicas (default ray.replicas)")
    serve.set_defaults(func=cmd_serve)
    run = sub.add_parser("run", help="start the runtime and serve prompts")
    run.add_argument("--config", help=f"sys.yaml path (default ./{DEFAULT_CONFIG} if present)")
    run.add_argument("--once", action="store_true", help="print the tree and stop")
    run.set_defaults(func=cmd_run)
    add_commands(sub)
    check = sub.add_parser("check-config", help="validate a configuration")
    check.add_argument("--config")
    check.set_defaults(func=cmd_check_config)
    fetch = sub.add_parser("fetch-default-model", help="assemble the default model's GGUF")
    fetch.set_defaults(func=cmd_fetch_default_model)
    sub.add_parser("make-test-model", help="write a tiny random-weight GGUF", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``erllama-py`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["make-test-model"]:
        return main_make_test_model(args_list[1:])
    args = _parser().parse_args(args_list)
    try:
        status: int = args.func(args)
    except ErllamaError as exc:
        print(f"erllama-py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erllama-py: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
