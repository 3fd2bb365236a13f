"""The inspection REPL: a Python prompt on a live runtime, with helpers.

``erllama-py repl`` attaches to the running daemon through its control socket;
``erllama_py.repl.embed(rt)`` opens the same prompt on a runtime in this process. Both
use the same control requests (`erllama_py.daemon.control_ops`), so they show the same
things. ``help()`` lists the helpers; ``help(kill)`` shows one.

``erllama-py repl --url URL`` attaches over HTTP only, to a server without a control
socket (a Ray Serve deployment): ``replicas()`` and ``complete()`` work there, the
helpers that need the socket say so.

Attaching is read-mostly: `kill` and `restart` ask for confirmation unless the REPL was
started with ``--yes`` (``embed(rt, yes=True)``).
"""

from __future__ import annotations

import builtins
import code
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.pretty import install as install_pretty
from rich.table import Table

from erllama_py.daemon.control_client import (
    ControlChannel,
    ControlError,
    LocalControl,
    SocketControl,
)
from erllama_py.daemon.control_ops import find_node
from erllama_py.daemon.http_client import HttpClientError, post_json
from erllama_py.daemon.messages import (
    ChildReply,
    ChildRequest,
    CountersReply,
    CountersRequest,
    KillReply,
    KillRequest,
    ModelsReply,
    ModelsRequest,
    Reply,
    Request,
    RestartReply,
    RestartRequest,
    RowsReply,
    RowsRequest,
    StatusReply,
    StatusRequest,
    TreeReply,
    TreeRequest,
)
from erllama_py.daemon.process import format_status
from erllama_py.daemon.replicas import NotOnRayError, ReplicaRow, fetch_replicas, replicas_table
from erllama_py.runtime import Runtime
from erllama_py.treeview import render_tree

__all__ = ["HELPER_NAMES", "Helpers", "HttpOnlyControl", "attach", "attach_http", "embed"]

HELPER_NAMES = (
    "status", "tree", "children", "models", "phase", "queue", "counters", "rows",
    "last_hit", "kill", "watch", "restart", "complete", "replicas",
)  # fmt: skip
WATCH_POLL_S = 0.1
R = TypeVar("R", bound=Reply)


class HttpOnlyControl:
    """The channel of a REPL attached over HTTP only (``erllama-py repl --url``): no
    control socket, so every control request fails with a message saying why."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def call(self, request: Request, expected: type[R]) -> R:
        raise ControlError(
            "NoControlSocket",
            f"{type(request).__name__} needs a daemon's control socket; this REPL talks to "
            f"{self.url} over HTTP only (replicas() and complete() work)",
        )

    def describe(self) -> str:
        return f"the server at {self.url} (HTTP only, no control socket)"


class Helpers:
    """The REPL's helpers on one control channel (bound into the prompt's namespace)."""

    def __init__(
        self,
        channel: ControlChannel,
        console: Console,
        *,
        yes: bool = False,
        runtime: Runtime | None = None,
        ask: Callable[[str], str] = input,
        api_key: str | None = None,
        url: str | None = None,
    ) -> None:
        self._channel = channel
        self._url = url
        self._console = console
        self._yes = yes
        self._runtime = runtime
        self._ask = ask
        self._api_key = api_key
        self._before_kill: dict[str, KillReply] = {}

    # ------------------------------------------------------------------ read

    def status(self) -> None:
        """Print the daemon's status: pid, uptime, URL, models, cache tiers, restarts."""
        reply = self._channel.call(StatusRequest(), StatusReply)
        self._console.print(format_status(reply), markup=False, highlight=False)

    def tree(self) -> None:
        """Draw the live supervision tree: name, kind, state, strategy, restarts, pid or
        thread."""
        snapshot = self._channel.call(TreeRequest(), TreeReply).tree
        self._console.print(render_tree(snapshot))

    def children(self, name: str) -> list[dict[str, Any]]:
        """The children of the supervisor `name` (a table, and their nodes)."""
        node = self._node(name)
        kids = [{k: v for k, v in c.items() if k != "children"} for c in node.get("children", ())]
        table = Table("id", "name", "kind", "state", "restarts", "pid / thread")
        for c in kids:
            where = f"pid {c['pid']}" if c.get("pid") else str(c.get("thread") or "")
            table.add_row(
                str(c["id"]), str(c.get("name") or ""), str(c["kind"]), str(c["state"]),
                str(c["restarts"]), where,
            )  # fmt: skip
        self._console.print(table)
        return kids

    def models(self) -> list[str]:
        """The loaded models, with phase, queue and worker (a table; returns their names)."""
        infos = self._channel.call(ModelsRequest(), ModelsReply).models
        table = Table("model", "status", "phase", "running", "queued", "worker pid", "restarts")
        for m in infos:
            worker = m["worker"]
            table.add_row(
                str(m["name"]), str(m["status"]), str(m["phase"]), str(m["active"]),
                str(m["pending_len"]), str(worker["pid"]), str(worker["restarts"]),
            )  # fmt: skip
        self._console.print(table)
        return [str(m["name"]) for m in infos]

    def _model(self, name: str) -> dict[str, Any]:
        for m in self._channel.call(ModelsRequest(), ModelsReply).models:
            if m["name"] == name:
                return m
        raise ControlError("ModelNotFoundError", f"no model {name!r} is loaded")

    def phase(self, m: str) -> str:
        """The phase of model `m` (idle, prefilling, generating, ...)."""
        return str(self._model(m)["phase"])

    def queue(self, m: str) -> dict[str, int]:
        """Model `m`'s requests: running and queued."""
        info = self._model(m)
        return {"running": int(info["active"]), "queued": int(info["pending_len"])}

    def counters(self) -> dict[str, Any]:
        """Every cache counter, and per-tier statistics."""
        return self._channel.call(CountersRequest(), CountersReply).counters

    def rows(self, tier: str | None = None) -> list[dict[str, Any]]:
        """The cache rows, of one tier (name or kind: ram, ram_file, disk) or of all."""
        return self._channel.call(RowsRequest(tier), RowsReply).rows

    def last_hit(self, m: str) -> dict[str, Any] | None:
        """How model `m`'s last request was served from the cache (kind, prefix length)."""
        hit = self._model(m)["last_cache_hit"]
        return dict(hit) if isinstance(hit, dict) else None

    # ------------------------------------------------------------------ act

    def _confirm(self, what: str) -> bool:
        if self._yes:
            return True
        answer = self._ask(f"{what}? [y/N] ").strip().lower()
        return answer in ("y", "yes")

    def kill(self, name: str) -> None:
        """Crash the child `name` (a worker process gets SIGKILL, an actor is failed); its
        supervisor restarts it. ``watch(name)`` shows it come back."""
        if not self._confirm(f"kill {name}"):
            self._console.print("not killed")
            return
        reply = self._channel.call(KillRequest(name), KillReply)
        self._before_kill[name] = reply
        where = f"pid {reply.pid}" if reply.pid else f"thread {reply.thread}"
        self._console.print(
            f"killed {name} ({reply.kind}, {where}, restarts {reply.restarts})",
            markup=False,
            highlight=False,
        )

    def watch(self, name: str, timeout: float = 60.0) -> None:
        """Show the supervisor bring `name` back after a kill: its state changes, then its
        new pid and restart count (up to `timeout` seconds)."""
        before = self._before_kill.get(name)
        first = self._child(name)
        old_pid = before.pid if before is not None else first.get("pid")
        old_restarts = before.restarts if before is not None else int(first.get("restarts", 0))
        deadline = time.monotonic() + timeout
        seen = ""
        while True:
            node = self._child(name)
            line = f"{name}: {node.get('state')}"
            if line != seen:
                self._console.print(line, markup=False, highlight=False)
                seen = line
            restarts = int(node.get("restarts") or 0)
            if node.get("state") == "running" and restarts > old_restarts:
                new = f"pid {old_pid} -> {node.get('pid')}" if node.get("pid") else "new thread"
                self._console.print(
                    f"{name} is back: {new}, restarts {old_restarts} -> {restarts}",
                    markup=False,
                    highlight=False,
                )
                self._before_kill.pop(name, None)
                return
            if time.monotonic() > deadline:
                self._console.print(f"{name} did not come back within {timeout:g} s")
                return
            time.sleep(WATCH_POLL_S)

    def restart(self, name: str) -> None:
        """Terminate the child `name` and start it again, through its supervisor."""
        if not self._confirm(f"restart {name}"):
            self._console.print("not restarted")
            return
        node = self._channel.call(RestartRequest(name), RestartReply).node or {}
        where = f"pid {node.get('pid')}" if node.get("pid") else f"thread {node.get('thread')}"
        self._console.print(
            f"restarted {name}: {node.get('state')}, {where}", markup=False, highlight=False
        )

    def complete(self, m: str, prompt: str, max_tokens: int = 32) -> str:
        """A quick completion of `prompt` on model `m`; prints its cache use, returns the
        text."""
        if self._runtime is not None:
            result = self._runtime.complete(m, prompt, max_tokens=max_tokens)
            text, cached = result.text, result.usage.cached_tokens
            prompt_tokens = result.usage.prompt_tokens
        else:
            url = self._http_url()
            body = {"model": m, "prompt": prompt, "max_tokens": max_tokens}
            reply = post_json(f"{url}/v1/completions", body, self._api_key)
            text = str(reply["choices"][0]["text"])
            usage = reply["usage"]
            prompt_tokens = int(usage["prompt_tokens"])
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        self._console.print(f"[dim]{prompt_tokens} prompt tokens, {cached} from the cache[/dim]")
        return text

    def replicas(self, url: str | None = None) -> list[ReplicaRow]:
        """On Ray Serve: every replica's cache counters (hits by kind, misses, saves, rows
        and bytes per tier) and queue, one row each (a table; returns the rows). `url`
        defaults to the server this REPL talks to."""
        try:
            status = fetch_replicas(url or self._http_url(), self._api_key)
        except NotOnRayError as exc:
            self._console.print(str(exc), markup=False, highlight=False)
            return []
        self._console.print(replicas_table(status))
        return list(status.replicas)

    def _http_url(self) -> str:
        if self._url is not None:
            return self._url
        url = self._channel.call(StatusRequest(), StatusReply).url
        if url is None:
            raise ControlError("NotServing", "the daemon has no HTTP address yet")
        return url

    # ------------------------------------------------------------------ help

    def _node(self, name: str) -> dict[str, Any]:
        found = find_node(self._channel.call(TreeRequest(), TreeReply).tree, name)
        if found is None:
            raise ControlError("ChildNotFound", f"no child named {name!r} in the tree")
        return found[0]

    def _child(self, name: str) -> dict[str, Any]:
        node = self._channel.call(ChildRequest(name), ChildReply).node
        if node is None:
            raise ControlError("ChildNotFound", f"no child named {name!r} in the tree")
        return node

    def help(self, *args: object) -> None:
        """List the helpers (``help(helper)`` shows one; other objects get Python's help)."""
        if args:
            builtins.help(*args)
            return
        self._console.print(f"erllama-py REPL on {self._channel.describe()}. Helpers:")
        for name in HELPER_NAMES:
            doc = (getattr(self, name).__doc__ or "").strip().split("\n\n")[0]
            self._console.print(f"  {name}: {' '.join(doc.split())}", markup=False)
        self._console.print("Python's own help: help(object).", markup=False)

    def namespace(self) -> dict[str, Any]:
        """The prompt's globals: every helper, and ``help``."""
        ns: dict[str, Any] = {name: getattr(self, name) for name in HELPER_NAMES}
        ns["help"] = self.help
        ns["__name__"] = "__erllama_repl__"
        return ns


class _Console(code.InteractiveConsole):
    """Shows a helper's `ControlError` or HTTP error in one line, not as a traceback."""

    def runcode(self, code_obj: Any) -> None:
        try:
            exec(code_obj, self.locals)
        except (ControlError, HttpClientError) as exc:
            self.write(f"error: {exc}\n")
        except SystemExit:
            raise
        except BaseException:
            self.showtraceback()


def _enable_readline(ns: dict[str, Any], history: Path | None) -> None:
    try:
        import readline  # noqa: PLC0415 - absent on some platforms
        import rlcompleter  # noqa: PLC0415
    except ImportError:
        return
    readline.set_completer(rlcompleter.Completer(ns).complete)
    readline.parse_and_bind("tab: complete")
    if history is not None:
        with contextlib.suppress(OSError):
            history.parent.mkdir(parents=True, exist_ok=True)
            if history.exists():
                readline.read_history_file(history)
        import atexit  # noqa: PLC0415

        atexit.register(lambda: _save_history(readline, history))


def _save_history(readline: Any, history: Path) -> None:
    with contextlib.suppress(OSError):
        readline.write_history_file(history)


def _interact(helpers: Helpers, console: Console, banner: str, history: Path | None) -> None:
    ns = helpers.namespace()
    _enable_readline(ns, history)
    install_pretty(console)
    _Console(ns).interact(banner=banner, exitmsg="bye")


def embed(rt: Runtime, *, yes: bool = False, url: str | None = None) -> None:
    """Open the REPL on `rt`, a runtime in this process (``help()`` lists the helpers)."""
    console = Console()
    helpers = Helpers(LocalControl(rt, url), console, yes=yes, runtime=rt)
    history = rt.config.daemon.log_file.parent / "repl_history"
    _interact(helpers, console, "erllama-py REPL (embedded runtime); help() lists the helpers",
              history)  # fmt: skip


def attach(
    socket_path: Path,
    *,
    yes: bool = False,
    history: Path | None = None,
    api_key: str | None = None,
) -> int:
    """Open the REPL on the daemon listening at `socket_path`; the exit status.

    Raises:
        ControlError: no daemon listens there, or it refuses this user.
    """
    console = Console()
    with SocketControl(socket_path) as channel:
        status = channel.call(StatusRequest(), StatusReply)
        helpers = Helpers(channel, console, yes=yes, api_key=api_key)
        banner = (
            f"erllama-py REPL attached to pid {status.pid} ({status.url}); help() lists the helpers"
        )
        _interact(helpers, console, banner, history)
    return 0


def attach_http(
    url: str,
    *,
    yes: bool = False,
    history: Path | None = None,
    api_key: str | None = None,
) -> int:
    """Open the REPL on the server at `url` over HTTP only (a Ray Serve deployment has no
    control socket); the exit status."""
    console = Console()
    channel = HttpOnlyControl(url)
    helpers = Helpers(channel, console, yes=yes, api_key=api_key, url=channel.url)
    banner = f"erllama-py REPL on {channel.describe()}; help() lists the helpers"
    _interact(helpers, console, banner, history)
    return 0
