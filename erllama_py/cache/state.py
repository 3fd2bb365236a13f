"""What every incarnation of the cache's actors shares, so that restarts lose nothing.

`CacheState` is created once by `erllama_py.cache.start` and handed to the
start function of each actor under ``cache_sup``. It holds the stores (the
RAM entries and the file tiers' directories), the counters, the name registry,
and the index currently published by the running meta actor. A restarted
meta actor builds a new index from the stores (scan) and publishes it here.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from erllama_py.cache.counters import Counters
from erllama_py.cache.filestore import FileStore
from erllama_py.cache.index import CacheIndex
from erllama_py.cache.ramstore import RamStore
from erllama_py.cache.rootlock import RootLocks
from erllama_py.config import CacheSettings
from erllama_py.errors import RuntimeStoppedError
from supervisors import Registry

__all__ = ["META_NAME", "WRITER_NAME", "CacheState", "tier_actor_name"]

META_NAME = "cache_meta"
RAM_NAME = "cache_ram"
WRITERS_NAME = "cache_writers"
WRITER_NAME = "cache_writer:{}"
INDEX_WAIT_S = 30.0  # how long a caller waits for a (re)starting meta actor's index


def tier_actor_name(kind: str, root: object) -> str:
    """Registry name of a file tier's actor: ``cache_ramfile:<root>`` / ``cache_disk:<root>``."""
    return f"cache_{kind.replace('_', '')}:{root}"


@dataclass
class CacheState:
    """State that outlives any one actor of the cache tree."""

    settings: CacheSettings
    registry: Registry
    ram: RamStore = field(default_factory=RamStore)
    counters: Counters = field(default_factory=Counters)
    files: dict[str, FileStore] = field(default_factory=dict)
    # Held from the first start of cache_sup until the cache stops (one runtime per root).
    roots: RootLocks = field(default_factory=RootLocks)
    _writers: dict[str, str] = field(default_factory=dict)
    stopped: bool = False
    _index: CacheIndex | None = None
    _index_ready: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Invariant: maps the future of every job queued to a writer, until it resolves, to
    # that writer's id.
    _jobs: dict[Future[Any], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tier in self.settings.tiers:
            if tier.kind != "ram":
                self.files[tier.name] = FileStore(tier, verify_on_scan=self.settings.verify_on_scan)

    def publish_index(self, index: CacheIndex) -> None:
        """Called by a meta actor once its index is built."""
        self._index = index
        self._index_ready.set()

    def index(self, timeout: float = INDEX_WAIT_S) -> CacheIndex:
        """The current index, waiting for the first meta actor to build one.

        Raises:
            RuntimeStoppedError: the cache was stopped, or no index appeared in time.
        """
        if self.stopped:
            raise RuntimeStoppedError("the cache has been stopped")
        if not self._index_ready.wait(timeout):
            raise RuntimeStoppedError("the cache's meta actor did not start in time")
        assert self._index is not None
        return self._index

    def writer_alive(self, writer: str) -> bool:
        """Whether a writer incarnation (its id, not its name) is still running."""
        with self._lock:
            return writer in self._writers.values()

    def writer_id_of(self, name: str) -> str | None:
        """The id of the running incarnation of the writer called `name`."""
        with self._lock:
            return self._writers.get(name)

    def writer_started(self, name: str, writer: str) -> None:
        with self._lock:
            self._writers[name] = writer

    def writer_ended(self, name: str, writer: str) -> None:
        with self._lock:
            if self._writers.get(name) == writer:
                del self._writers[name]

    def job_queued(self, writer: str, future: Future[Any]) -> None:
        """Count a job handed to a writer (its id) as in flight until its future resolves."""
        with self._lock:
            self._jobs[future] = writer
        future.add_done_callback(self._job_done)

    def _job_done(self, future: Future[Any]) -> None:
        with self._lock:
            self._jobs.pop(future, None)

    def jobs_in_flight(self, writer: str | None = None) -> int:
        """Jobs queued to or running in one writer (its id), or in the whole pool.

        Unlike an inbox, this counts the job a writer is running; and a demotion has no
        reservation while its writer frames it, so reservations alone do not tell either.
        """
        with self._lock:
            return sum(1 for w in self._jobs.values() if writer is None or w == writer)
