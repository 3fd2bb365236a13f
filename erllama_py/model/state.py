"""What a model's actors share across restarts: settings, the worker's identity,
the cache namespace, and the lock-free observability row.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from erllama_py.cache.handle import CacheHandle
from erllama_py.cache.key import Namespace, ctx_params_hash
from erllama_py.cache.policy import SavePolicy
from erllama_py.kinds import Phase
from erllama_py.model.arena import Arena
from erllama_py.model.backend import BackendInfo
from erllama_py.model.bufpool import BufferPool
from erllama_py.model.deadline import WorkerDeadline
from erllama_py.model.protocol import WorkerSpec
from erllama_py.results import CacheHit
from supervisors import Registry

__all__ = ["ModelObs", "ModelState", "actor_name", "sup_name", "worker_name"]


def sup_name(model: str) -> str:
    return f"model:{model}"


def worker_name(model: str) -> str:
    return f"model:{model}/worker"


def actor_name(model: str) -> str:
    return f"model:{model}/actor"


@dataclass
class ModelObs:
    """Observability row, written by the model actor, read by anyone without its mailbox.

    Values lag by up to one tick.
    """

    phase: Phase = Phase.IDLE
    pending_len: int = 0
    active: int = 0
    last_cache_hit: CacheHit | None = None
    requests_done: int = 0
    tokens_generated: int = 0
    worker_hangs: int = 0  # workers killed for missing a call's deadline
    seqs_moved: int = 0  # sequences moved down to close a gap in the ids in use


@dataclass
class ModelState:
    """One loaded model's shared state (outlives its actor and worker incarnations)."""

    name: str
    spec: WorkerSpec
    policy: SavePolicy
    tier: str
    deterministic: bool
    cache: CacheHandle
    registry: Registry
    loaded_at: float = field(default_factory=time.time)
    obs: ModelObs = field(default_factory=ModelObs)
    _info: BackendInfo | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    worker_starts: int = 0
    unloading: bool = False
    fingerprint: bytes | None = None
    buffers: BufferPool = field(default_factory=BufferPool)
    # The runtime's arena (shared by every model): packed states and promoted rows.
    arena: Arena = field(default_factory=Arena)
    max_queue: int = 64
    deadline: WorkerDeadline = field(default_factory=WorkerDeadline)

    @property
    def info(self) -> BackendInfo:
        """The model as its first worker described it."""
        assert self._info is not None, "no worker has loaded the model yet"
        return self._info

    def worker_loaded(self, info: BackendInfo) -> None:
        """Record a (re)started worker's description."""
        with self._lock:
            if self._info is None:
                self._info = info
            self.worker_starts += 1

    def namespace(self) -> Namespace:
        """The cache namespace of this model: fingerprint, quant, state-layout parameters."""
        info = self.info
        params = dict(info.ctx_params)
        params["n_seq_max"] = info.n_seq_max
        params["n_vocab"] = info.n_vocab
        return Namespace(
            fingerprint=self.fingerprint or info.fingerprint,
            quant=info.quant,
            ctx_hash=ctx_params_hash(**params),
        )
