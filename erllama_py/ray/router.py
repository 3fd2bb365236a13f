"""`CacheAffinityRouter`: Ray Serve's request-router extension point, keyed on our cache.

Serve calls `choose_replicas` for each request to the replica deployment; the
request's first argument is an `HttpCall` whose ``affinity`` is the chained hash of
its prompt's first blocks (computed by the ingress, `erllama_py.ray.affinity`). The
policy (`choose_target`) prefers the replica that was sent the longest matching
prefix, else the first block's rendezvous replica, unless its queue is too long
compared with the others, then the least-loaded one. The other replicas follow as a
second rank, least loaded first, so a full replica never blocks a request.

Requests are matched to the replica chosen for them (no FIFOMixin: FIFO hands a
replica to whichever request waited longest, which would scatter conversations).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from erllama_py.ray.affinity import AffinityMap, choose_target
from erllama_py.ray.messages import HttpCall

__all__ = ["CacheAffinityRouter"]

log = logging.getLogger("erllama_py.ray")


def _key_of(pending: PendingRequest | None) -> tuple[str, ...]:
    if pending is None:
        return ()
    for arg in pending.args:
        if isinstance(arg, HttpCall):
            return arg.affinity
    return ()


class CacheAffinityRouter(RequestRouter):
    """Routes a request to the replica most likely to hold its longest cached prefix."""

    def initialize_state(self, imbalance_threshold: int = 4, max_entries: int = 200_000,
                         **_: Any) -> None:  # fmt: skip
        self._imbalance_threshold = imbalance_threshold
        self._where = AffinityMap(max_entries)
        self.decisions: dict[str, int] = {"prefix": 0, "rendezvous": 0, "load": 0}

    def _queue_len(self, replica: RunningReplica) -> int:
        cached = self._replica_queue_len_cache.get(replica.replica_id)
        return 0 if cached is None else int(cached)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        lens = {rid: self._queue_len(r) for rid, r in by_id.items()}
        key = _key_of(pending_request)
        try:
            choice = choose_target(key, self._where, lens, self._imbalance_threshold)
        except Exception:  # a bug here must not strand the request: any replica will do
            log.exception("the affinity policy failed; routing by load")
            return [sorted(candidate_replicas, key=self._queue_len)]
        self.decisions[choice.reason] += 1
        first = by_id[choice.replica]
        rest = sorted((r for r in candidate_replicas if r is not first), key=self._queue_len)
        return [[first], rest] if rest else [[first]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        # Record where the request went, which is not always the first rank's replica.
        key = _key_of(pending_request)
        if key:
            self._where.record(key, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._where.forget(replica_id.unique_id)
