"""`ErllamaReplica`: one Ray Serve replica, a whole erllama-py runtime on its node.

Each replica starts its own supervision tree, context workers and cache tiers
(node-local roots, `erllama_py.ray.slots`) and serves its own OpenAI app
(`erllama_py.server.app.create_app`, the very app of ``erllama-py serve``) in
process: the ingress hands it `HttpCall`s and streams back what the app answers.
Serve restarts a replica whose process dies (and one whose `check_health` raises);
inside it, our supervisors restart crashed context workers, as on one machine.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import ray
from ray import serve

from erllama_py.config import Config
from erllama_py.errors import ErllamaError
from erllama_py.ray.asgi_call import call_app
from erllama_py.ray.messages import HttpCall, HttpStart, ReplicaStatus
from erllama_py.ray.slots import claim_slot, node_local_config
from erllama_py.runtime import Runtime, start
from erllama_py.server.app import create_app
from erllama_py.server.metrics import Metrics

__all__ = ["REPLICA_HEADER", "ErllamaReplica"]

REPLICA_HEADER = b"x-erllama-replica"


class ErllamaReplica:
    """A runtime and its OpenAI app, inside one Serve replica."""

    def __init__(self, config: Config) -> None:
        self.node_id: str = ray.get_runtime_context().get_node_id()
        self.replica_id: str = serve.get_replica_context().replica_id.unique_id
        self._id_bytes = self.replica_id.encode()
        self._slot = claim_slot(self.node_id)
        self.config = node_local_config(config, self.node_id, self._slot.number)
        self.runtime: Runtime = start(self.config)
        self.metrics = Metrics(self.runtime)
        self.app = create_app(self.runtime, self.config.server, self.metrics)

    async def handle_http(self, call: HttpCall) -> AsyncIterator[HttpStart | bytes]:
        """Serve one HTTP request with this replica's app (streamed back); the answer
        names the replica (``x-erllama-replica``), so a client can see where it went."""
        async for item in call_app(self.app, call):
            if isinstance(item, HttpStart):
                yield HttpStart(item.status, (*item.headers, (REPLICA_HEADER, self._id_bytes)))
            else:
                yield item

    def _status(self) -> ReplicaStatus:
        rt = self.runtime
        return ReplicaStatus(
            replica=self.replica_id,
            node_id=self.node_id,
            slot=self._slot.number,
            pid=os.getpid(),
            tier_roots=tuple(str(t.root) for t in self.config.cache.tiers if t.root),
            counters=rt.counters().to_dict(),
            models=tuple(m.to_dict() for m in rt.models()),
        )

    async def status(self) -> ReplicaStatus:
        """Where this replica runs and its cache counters (``/ray/status``)."""
        return await asyncio.to_thread(self._status)

    async def metrics_text(self) -> tuple[str, bytes]:
        """This replica's id and its Prometheus metrics."""
        return self.replica_id, await asyncio.to_thread(self.metrics.render)

    def check_health(self) -> None:
        """Serve's health check: fails when the runtime or a configured model is gone."""
        rt = self.runtime
        if rt.stopped:
            raise RuntimeError("the runtime of this replica has stopped")
        try:
            infos = {m.name: m for m in rt.models()}
        except ErllamaError as exc:
            raise RuntimeError(f"the runtime does not answer: {exc}") from exc
        for settings in self.config.models:
            info = infos.get(settings.name)
            if info is None or info.status == "failed":
                raise RuntimeError(f"model {settings.name} is not serving")

    def __del__(self) -> None:
        rt = getattr(self, "runtime", None)
        if rt is not None and not rt.stopped:
            rt.stop()
