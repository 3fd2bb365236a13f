"""What each control request does, on a running `Runtime` (the daemon's or an embedded one).

`Control.handle` answers one typed request with one typed reply; errors become an
`ErrorReply` naming the error's class. The control server calls it for each frame, and an
embedded REPL calls it directly, so both see the same answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pykka

from erllama_py.daemon.messages import (
    CacheCheckReply,
    CacheCheckRequest,
    CacheGcReply,
    CacheGcRequest,
    ChildReply,
    ChildRequest,
    CountersReply,
    CountersRequest,
    ErrorReply,
    KillReply,
    KillRequest,
    ModelsReply,
    ModelsRequest,
    ModelSummary,
    Reply,
    Request,
    RestartReply,
    RestartRequest,
    RowsReply,
    RowsRequest,
    StatusReply,
    StatusRequest,
    TierSummary,
    TreeReply,
    TreeRequest,
)
from erllama_py.errors import ErllamaError
from erllama_py.runtime import Runtime
from supervisors import SupervisorError, kill, restart_child, terminate_child

__all__ = ["Control", "ControlRefusedError", "find_node"]

RESTART_TIMEOUT_S = 120.0


class ControlRefusedError(Exception):
    """A request that cannot be done on this child (the message says why)."""


def _walk(
    node: dict[str, Any], parent: dict[str, Any] | None = None
) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    yield node, parent
    for child in node.get("children", ()):
        yield from _walk(child, node)


def find_node(
    tree: dict[str, Any], name: str
) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """The node named `name` (its registry name, else its id) and its parent's node."""
    for node, parent in _walk(tree):
        if node.get("name") == name:
            return node, parent
    for node, parent in _walk(tree):
        if node.get("id") == name:
            return node, parent
    return None


class Control:
    """Answers control requests on `runtime`.

    Args:
        runtime: the runtime to inspect.
        url: the HTTP server's address, if one serves this runtime.
    """

    def __init__(self, runtime: Runtime, url: Callable[[], str | None] = lambda: None) -> None:
        self.runtime = runtime
        self._url = url
        self.started_at = time.time()

    def handle(self, request: Request) -> Reply:
        """One reply; never raises for a failed request (it answers an `ErrorReply`)."""
        try:
            return self._dispatch(request)
        except (ErllamaError, SupervisorError, ControlRefusedError, pykka.Timeout) as exc:
            return ErrorReply(type(exc).__name__, str(exc) or type(exc).__name__)
        except pykka.ActorDeadError as exc:
            return ErrorReply("ActorDeadError", str(exc))

    def _dispatch(self, request: Request) -> Reply:
        rt = self.runtime
        if isinstance(request, StatusRequest):
            return self.status()
        if isinstance(request, TreeRequest):
            return TreeReply(dict(rt.tree()))
        if isinstance(request, ChildRequest):
            found = find_node(dict(rt.tree()), request.name)
            return ChildReply(request.name, None if found is None else _leaf(found[0]))
        if isinstance(request, ModelsRequest):
            return ModelsReply([m.to_dict() for m in rt.models()])
        if isinstance(request, CountersRequest):
            return CountersReply(rt.counters().to_dict())
        if isinstance(request, RowsRequest):
            rows = rt.cache_rows()
            if request.tier is not None:
                rows = [r for r in rows if request.tier in (r.tier, str(r.kind))]
            return RowsReply([r.to_dict() for r in rows])
        if isinstance(request, CacheCheckRequest):
            return CacheCheckReply(rt.cache.check())
        if isinstance(request, CacheGcRequest):
            return CacheGcReply(rt.cache.gc())
        if isinstance(request, KillRequest):
            return self.kill(request.name)
        if isinstance(request, RestartRequest):
            return self.restart(request.name)
        return ErrorReply("ProtocolError", f"{type(request).__name__} is not a request")

    def status(self) -> StatusReply:
        rt = self.runtime
        infos = rt.models()
        models = [
            ModelSummary(
                name=m.name,
                status=m.status,
                phase=str(m.phase),
                active=m.active,
                queued=m.pending_len,
                worker_pid=m.worker.pid,
                worker_state=m.worker.state,
                worker_restarts=m.worker.restarts,
            )
            for m in infos
        ]
        loaded = {m.name: m for m in models}
        for settings in rt.config.models:
            if settings.name not in loaded:  # configured, still loading (or not yet begun)
                models.append(ModelSummary(settings.name, "loading", "loading", 0, 0, None,
                                           "starting", 0))  # fmt: skip
        ready = all(
            name in loaded
            and loaded[name].status == "loaded"
            and loaded[name].worker_state == "running"
            for name in (s.name for s in rt.config.models)
        )
        tiers = [
            TierSummary(t.name, str(t.kind), t.rows, t.bytes, t.quota_bytes)
            for t in rt.counters().tiers
        ]
        return StatusReply(
            pid=os.getpid(),
            started_at=self.started_at,
            uptime_s=round(time.time() - self.started_at, 3),
            url=self._url(),
            ready=ready,
            models=models,
            tiers=tiers,
            worker_restarts=sum(m.worker_restarts for m in models),
        )

    def _located(self, name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        found = find_node(dict(self.runtime.tree()), name)
        if found is None:
            raise ControlRefusedError(f"no child named {name!r} in the tree")
        return found

    def kill(self, name: str) -> KillReply:
        node, parent = self._located(name)
        if parent is None:
            raise ControlRefusedError(f"{name!r} is the root supervisor; use daemon stop")
        handle = self.runtime.registry.whereis(node.get("name") or name)
        if handle is None:
            raise ControlRefusedError(f"{name!r} has no running instance ({node.get('state')})")
        kill(handle)
        return KillReply(
            name=name,
            kind="process" if node.get("pid") else "actor",
            pid=node.get("pid"),
            thread=node.get("thread"),
            restarts=int(node.get("restarts") or 0),
        )

    def restart(self, name: str) -> RestartReply:
        node, parent = self._located(name)
        if parent is None:
            raise ControlRefusedError(f"{name!r} is the root supervisor; use daemon restart")
        if parent.get("strategy") == "simple_one_for_one":
            raise ControlRefusedError(
                f"{name!r} is a dynamic child of {parent.get('name')!r}: unload and load the "
                "model instead (or kill it to watch it fail)"
            )
        sup = self.runtime.registry.whereis(str(parent.get("name")))
        if not isinstance(sup, pykka.ActorRef):
            raise ControlRefusedError(f"the supervisor of {name!r} is not running")
        child_id = str(node["id"])
        terminate_child(sup, child_id, timeout=RESTART_TIMEOUT_S)
        restart_child(sup, child_id, timeout=RESTART_TIMEOUT_S)
        found = find_node(dict(self.runtime.tree()), name)
        return RestartReply(name, None if found is None else _leaf(found[0]))


def _leaf(node: dict[str, Any]) -> dict[str, Any]:
    """A node without its subtree (a child's own facts)."""
    return {k: v for k, v in node.items() if k != "children"}
