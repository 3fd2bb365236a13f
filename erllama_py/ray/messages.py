"""What the ingress and the replicas send each other through Serve (typed, picklable).

An HTTP request crosses as one `HttpCall` (the router reads its ``affinity`` key);
its answer comes back as a stream: one `HttpStart`, then body chunks (``bytes``).
`ReplicaStatus` is one replica's answer to ``status`` (the ``/ray/status`` page).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["HttpCall", "HttpStart", "ReplicaStatus"]


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request for a replica's OpenAI app."""

    method: str
    path: str
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    affinity: tuple[str, ...] = ()  # chained prefix-block hashes (erllama_py.ray.affinity)


@dataclass(frozen=True)
class HttpStart:
    """The start of a replica's answer: status and headers; body chunks follow."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class ReplicaStatus:
    """A replica, where it runs, and its runtime's cache counters and models."""

    replica: str
    node_id: str
    slot: int
    pid: int
    tier_roots: tuple[str, ...]
    counters: dict[str, Any] = field(default_factory=dict)
    models: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "node_id": self.node_id,
            "slot": self.slot,
            "pid": self.pid,
            "tier_roots": list(self.tier_roots),
            "counters": self.counters,
            "models": list(self.models),
        }
