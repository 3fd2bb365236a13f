"""Shared by the Ray suite and bench/ray_replay.py: a local multi-node Ray cluster, the
configuration of a deployment on it, and a multi-turn replay through the ingress."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import ray
from ray.cluster_utils import Cluster

REPLICA_RESOURCE = "erllama_replica"  # one per node: one replica per node
POLICY = {"min_tokens": 4, "cold_min_tokens": 4, "boundary_trim_tokens": 0,
          "boundary_align_tokens": 1}  # fmt: skip


def start_cluster(nodes: int, attempts: int = 2) -> Cluster:
    """A local cluster of `nodes` nodes, each with one replica resource, Ray connected.

    Ray waits a fixed 30 s for each raylet to register; on 2 cores shared with other
    test runs that can pass, so the start is tried again once from scratch.
    """
    for attempt in range(attempts):
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=1, include_dashboard=False,
                             resources={REPLICA_RESOURCE: 1})  # fmt: skip
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=1, resources={REPLICA_RESOURCE: 1})
            ray.init(address=cluster.address, log_to_driver=False)
            return cluster
        except Exception:
            cluster.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ray_config(root: Path, model: Path, *, replicas: int, router: str = "affinity",
               ram_mb: int = 32, n_ctx: int = 1024) -> dict[str, Any]:  # fmt: skip
    """Tiny model saved to a node-local disk tier; one replica per node (a custom resource)."""
    return {
        "cache": {
            "tiers": [
                {"kind": "ram", "quota_mb": ram_mb},
                {"kind": "disk", "root": str(root / "kvc" / "{node}"), "quota_mb": 256},
            ]
        },
        "policy": POLICY,
        "models": [
            {
                "name": "tiny",
                "model_path": str(model),
                "n_ctx": n_ctx,
                "n_batch": 64,
                "n_seq_max": 2,
                "n_threads": 1,
                "tier": "disk",
            }
        ],
        "ray": {
            "replicas": replicas,
            "num_cpus_per_replica": 0.5,
            "resources_per_replica": {REPLICA_RESOURCE: 1},
            "router": router,
            "affinity_block_chars": 64,
        },
    }


@dataclass
class Turn:
    conversation: int
    turn: int
    replica: str
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Replay:
    turns: list[Turn] = field(default_factory=list)

    def later(self) -> list[Turn]:
        return [t for t in self.turns if t.turn > 0]

    def cached_share(self) -> float:
        later = self.later()
        return sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later))

    def replicas_of(self, conversation: int) -> set[str]:
        return {t.replica for t in self.later() if t.conversation == conversation}


def opening(conversation: int, salt: str) -> list[dict[str, str]]:
    topic = ["printing presses", "tide pools", "steam engines", "glass blowing", "bee hives",
             "star maps", "rope bridges", "paper mills"][conversation % 8]  # fmt: skip
    return [
        {"role": "system", "content": f"[{salt}] You answer questions about {topic}. " * 4},
        {"role": "user", "content": f"About {topic}, conversation {conversation}?"},
    ]


def replay(client: openai.OpenAI, *, conversations: int, turns: int, salt: str,
           max_tokens: int = 8) -> Replay:  # fmt: skip
    """Interleaved conversations, each resending its whole history every turn."""
    histories = [opening(c, salt) for c in range(conversations)]
    result = Replay()
    for turn in range(turns):
        for c, messages in enumerate(histories):
            raw = client.chat.completions.with_raw_response.create(
                model="tiny",
                messages=messages,
                max_tokens=max_tokens,
                temperature=0,  # type: ignore[arg-type]
            )
            reply = raw.parse()
            usage = reply.usage
            assert usage is not None and usage.prompt_tokens_details is not None
            result.turns.append(Turn(c, turn, raw.headers["x-erllama-replica"],
                                     usage.prompt_tokens,
                                     usage.prompt_tokens_details.cached_tokens or 0))  # fmt: skip
            answer = reply.choices[0].message.content or ""
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": f"Go on about point {turn + 1}, please."},
            ]
    return result
