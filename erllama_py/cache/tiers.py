"""Tier actors: the supervised owners of the RAM store and of each file tier's directory.

Reads never queue here (loads run in the caller's thread on a pinned row).
A file tier's actor takes the small, slow chores off the meta actor's thread:
rewriting hit counts in file headers and reporting what the directory holds.
The RAM tier's actor reports its store; the store itself outlives it.
"""

from __future__ import annotations

from typing import Any

from erllama_py.cache.actions import PersistHits
from erllama_py.cache.filestore import FileStore
from erllama_py.cache.state import CacheState
from supervisors import SupervisedActor

__all__ = ["FileTierActor", "RamTierActor"]


class FileTierActor(SupervisedActor):
    """One ``ram_file`` or ``disk`` root."""

    def __init__(self, shared: CacheState, store: FileStore) -> None:
        super().__init__()
        self.shared = shared
        self.store = store

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, PersistHits):
            self.store.persist_hits(message.path, message.hits)
            return None
        return super().on_receive(message)

    def usage(self) -> dict[str, int]:
        """Files and bytes actually in the directory (temp files included in bytes)."""
        files, size = self.store.usage()
        return {"files": files, "bytes": size}


class RamTierActor(SupervisedActor):
    """The RAM tier (its entries live in `CacheState.ram`, which survives restarts)."""

    def __init__(self, shared: CacheState) -> None:
        super().__init__()
        self.shared = shared

    def usage(self) -> dict[str, int]:
        """Rows and payload bytes held."""
        return {"rows": len(self.shared.ram), "bytes": self.shared.ram.total_bytes()}
