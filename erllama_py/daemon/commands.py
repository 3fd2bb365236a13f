"""The command line's daemon and client commands (registered by `erllama_py.cli`).

::

    erllama-py daemon start|stop|status|restart|logs [--config sys.yaml]
    erllama-py models [--url URL]                  the daemon's models (HTTP)
    erllama-py status [--url URL] [--json]         a Ray Serve deployment's replicas (HTTP)
    erllama-py complete MODEL PROMPT [--url URL]   stream a completion to the terminal (HTTP)
    erllama-py chat MODEL [--url URL]              an interactive chat, cached tokens per turn
    erllama-py cache stats|ls|check|gc             the daemon's cache (control socket)
    erllama-py tree                                the daemon's live supervision tree
    erllama-py repl [--yes] [--url URL]            a Python prompt attached to the daemon

Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from erllama_py.config import Config, load_config
from erllama_py.daemon import process
from erllama_py.daemon.control_client import ControlError, SocketControl
from erllama_py.daemon.http_client import HttpClientError, get_json, stream_events
from erllama_py.daemon.messages import (
    CacheCheckReply,
    CacheCheckRequest,
    CacheGcReply,
    CacheGcRequest,
    CountersReply,
    CountersRequest,
    RowsReply,
    RowsRequest,
    StatusReply,
    StatusRequest,
    TreeReply,
    TreeRequest,
)
from erllama_py.daemon.replicas import NotOnRayError, fetch_replicas, replicas_table
from erllama_py.errors import ErllamaError
from erllama_py.treeview import render_tree

__all__ = ["add_commands"]

START_TIMEOUT_S = 600.0  # a large model loads for minutes
STOP_MARGIN_S = 30.0  # beyond server.shutdown_timeout_s, for the shutdown saves

Handler = Callable[[argparse.Namespace], int]


def _config(args: argparse.Namespace) -> Config:
    from erllama_py.cli import _config_path  # noqa: PLC0415 - cli imports this module

    return load_config(_config_path(args.config))


def _one_line(handler: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ControlError, HttpClientError, ErllamaError, OSError) as exc:
            print(f"erllama-py: {exc}", file=sys.stderr, flush=True)
            return 1

    return run


def _socket(args: argparse.Namespace) -> Path:
    path = getattr(args, "socket", None)
    return Path(path) if path else _config(args).daemon.control_socket


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    config = _config(args)
    try:
        with SocketControl(config.daemon.control_socket) as control:
            url = control.call(StatusRequest(), StatusReply).url
    except ControlError:
        url = None
    if url:
        return url
    host, port = config.server.host, config.server.port
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key:
        return str(args.api_key)
    keys = _config(args).server.api_keys
    return keys[0] if keys else None


# --------------------------------------------------------------------------- daemon


def cmd_daemon_start(args: argparse.Namespace) -> int:
    from erllama_py.cli import _config_path  # noqa: PLC0415

    path = _config_path(args.config)
    return process.start(load_config(path), path, args.timeout)


def _stop_timeout(args: argparse.Namespace, config: Config) -> float:
    if args.timeout is not None:
        return float(args.timeout)
    return config.server.shutdown_timeout_s + STOP_MARGIN_S


def cmd_daemon_stop(args: argparse.Namespace) -> int:
    config = _config(args)
    return process.stop(config, _stop_timeout(args, config))


def cmd_daemon_restart(args: argparse.Namespace) -> int:
    from erllama_py.cli import _config_path  # noqa: PLC0415

    path = _config_path(args.config)
    config = load_config(path)
    process.stop(config, _stop_timeout(args, config))
    return process.start(config, path, START_TIMEOUT_S)


def cmd_daemon_status(args: argparse.Namespace) -> int:
    return process.status(_config(args), args.json)


def cmd_daemon_logs(args: argparse.Namespace) -> int:
    return process.logs(_config(args), args.lines, args.follow)


# --------------------------------------------------------------------------- HTTP clients


def cmd_models(args: argparse.Namespace) -> int:
    listing = get_json(f"{_url(args)}/v1/models", _api_key(args))
    for model in listing.get("data", []):
        print(model["id"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    url = _url(args)
    try:
        status = fetch_replicas(url, _api_key(args))
    except NotOnRayError as exc:
        print(json.dumps({"url": url, "ray": False}) if args.json else str(exc))
        return 0
    if args.json:
        print(json.dumps({**status.to_dict(), "ray": True}, indent=2))
    else:
        Console().print(replicas_table(status))
    return 0 if status.replicas else 1


def cmd_complete(args: argparse.Namespace) -> int:
    body = {
        "model": args.model,
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, Any] | None = None
    for event in stream_events(f"{_url(args)}/v1/completions", body, _api_key(args)):
        for choice in event.get("choices") or ():
            sys.stdout.write(choice.get("text") or "")
            sys.stdout.flush()
        usage = event.get("usage") or usage
    sys.stdout.write("\n")
    if usage is not None:
        print(_usage_line(usage), file=sys.stderr)
    return 0


def _usage_line(usage: dict[str, Any]) -> str:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return (
        f"[{usage.get('prompt_tokens')} prompt tokens, {cached} cached tokens, "
        f"{usage.get('completion_tokens')} generated]"
    )


def cmd_chat(args: argparse.Namespace) -> int:
    url, key = _url(args), _api_key(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"chatting with {args.model} at {url} (empty line or Ctrl-D ends)", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        body = {
            "model": args.model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        reply: list[str] = []
        usage: dict[str, Any] | None = None
        sys.stdout.write(f"{args.model}> ")
        for event in stream_events(f"{url}/v1/chat/completions", body, key):
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") or ""
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            usage = event.get("usage") or usage
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        if usage is not None:
            print(_usage_line(usage), flush=True)


# --------------------------------------------------------------------------- control socket


def cmd_cache(args: argparse.Namespace) -> int:
    console = Console()
    with SocketControl(_socket(args)) as control:
        if args.action == "stats":
            counters = control.call(CountersRequest(), CountersReply).counters
            print(json.dumps(counters, indent=2))
        elif args.action == "ls":
            rows = control.call(RowsRequest(args.tier), RowsReply).rows
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in [] if args.json else rows:
                print(
                    f"{row['key'][:16]}  {row['tier']:<10} {row['tokens']:>7} tokens "
                    f"{row['bytes']:>12} bytes  hits {row['hits']:<4} {row['reason']} "
                    f"{row['status']}"
                )
            if not args.json:
                print(f"{len(rows)} rows")
        elif args.action == "check":
            with console.status("checking the cache index against its tiers ..."):
                problems = control.call(CacheCheckRequest(), CacheCheckReply).problems
            for problem in problems:
                print(problem)
            print("the cache is sound" if not problems else f"{len(problems)} problems")
            return 0 if not problems else 1
        else:
            evicted = control.call(CacheGcRequest(), CacheGcReply).evicted
            print(f"evicted {evicted} rows")
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    with SocketControl(_socket(args)) as control:
        snapshot = control.call(TreeRequest(), TreeReply).tree
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        Console().print(render_tree(snapshot))
    return 0


def cmd_repl(args: argparse.Namespace) -> int:
    from erllama_py.repl import attach, attach_http  # noqa: PLC0415 - only the REPL needs it

    config = _config(args)
    history = config.daemon.log_file.parent / "repl_history"
    key = config.server.api_keys[0] if config.server.api_keys else None
    if args.url:
        return attach_http(args.url, yes=args.yes, history=history, api_key=key)
    return attach(_socket(args), yes=args.yes, history=history, api_key=key)


# --------------------------------------------------------------------------- parser


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="sys.yaml path (default ./sys.yaml if present)")


def _http_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--url", help="the daemon's URL (default: its status, else server.host/port)")
    p.add_argument("--api-key", help="bearer key (default: server.api_keys[0])")


def _socket_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--socket", help="control socket path (default: daemon.control_socket)")


def add_commands(sub: Any) -> None:
    """Add the daemon and client commands to the CLI's subparsers."""
    daemon = sub.add_parser("daemon", help="run the server in the background")
    actions = daemon.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start the daemon; returns once it is ready")
    _config_arg(start)
    start.add_argument("--timeout", type=float, default=START_TIMEOUT_S,
                       help="seconds to wait for readiness")  # fmt: skip
    start.set_defaults(func=_one_line(cmd_daemon_start))
    stop = actions.add_parser("stop", help="stop gracefully (SIGTERM), SIGKILL after --timeout")
    _config_arg(stop)
    stop.add_argument("--timeout", type=float, help="seconds before SIGKILL")
    stop.set_defaults(func=_one_line(cmd_daemon_stop))
    status = actions.add_parser("status", help="exit 0 running, 3 not running")
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_one_line(cmd_daemon_status))
    restart = actions.add_parser("restart", help="stop, then start")
    _config_arg(restart)
    restart.add_argument("--timeout", type=float, help="seconds before SIGKILL on the stop")
    restart.set_defaults(func=_one_line(cmd_daemon_restart))
    logs = actions.add_parser("logs", help="print the daemon's log")
    _config_arg(logs)
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines to print")
    logs.add_argument("-f", "--follow", action="store_true", help="then follow it")
    logs.set_defaults(func=_one_line(cmd_daemon_logs))

    models = sub.add_parser("models", help="list the daemon's models")
    _http_args(models)
    models.set_defaults(func=_one_line(cmd_models))
    status_cmd = sub.add_parser(
        "status", help="the replicas of a Ray Serve deployment: cache counters and queues"
    )
    status_cmd.add_argument("--json", action="store_true", help="print JSON")
    _http_args(status_cmd)
    status_cmd.set_defaults(func=_one_line(cmd_status))
    complete = sub.add_parser("complete", help="stream a completion from the daemon")
    complete.add_argument("model")
    complete.add_argument("prompt")
    complete.add_argument("--max-tokens", type=int, default=128)
    _http_args(complete)
    complete.set_defaults(func=_one_line(cmd_complete))
    chat = sub.add_parser("chat", help="chat with a model of the daemon (cached tokens per turn)")
    chat.add_argument("model")
    chat.add_argument("--system", help="a system message")
    chat.add_argument("--max-tokens", type=int, default=256)
    _http_args(chat)
    chat.set_defaults(func=_one_line(cmd_chat))

    cache = sub.add_parser("cache", help="the daemon's KV cache")
    cache.add_argument("action", choices=("stats", "ls", "check", "gc"))
    cache.add_argument("--tier", help="ls: only this tier (name or kind)")
    cache.add_argument("--json", action="store_true", help="ls: print JSON")
    _socket_args(cache)
    cache.set_defaults(func=_one_line(cmd_cache))
    tree = sub.add_parser("tree", help="the daemon's live supervision tree")
    tree.add_argument("--json", action="store_true", help="print JSON")
    _socket_args(tree)
    tree.set_defaults(func=_one_line(cmd_tree))
    repl = sub.add_parser("repl", help="a Python prompt attached to the daemon")
    repl.add_argument("--yes", action="store_true", help="kill and restart without asking")
    repl.add_argument("--url", help="attach over HTTP only to this server (a Ray Serve "
                      "deployment: replicas(), complete())")  # fmt: skip
    _socket_args(repl)
    repl.set_defaults(func=_one_line(cmd_repl))
