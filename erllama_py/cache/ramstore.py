"""Storage behind the RAM tier: payload buffers held by reference, plus what each row is.

The store outlives the actors that use it (the cache handle creates it and
passes it to every incarnation of the RAM tier and of the meta actor), so a
crash of either never loses RAM rows: the restarted meta re-registers them
from `entries()`. Payloads are kept by reference, never copied: immutable
``bytes`` as they are, and shared-memory buffers (anything with ``close()``)
whose ownership the saver handed over. The meta actor is the only writer;
loads read entries from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from erllama_py.cache.key import Namespace
from erllama_py.cache.payload import Payload, payload_view, release_payload
from erllama_py.kinds import SaveReason

__all__ = ["RamEntry", "RamStore"]


@dataclass(frozen=True)
class RamEntry:
    """One RAM row: identity, token list (u32 LE), checksum and the payload itself."""

    key: bytes
    namespace: Namespace
    tokens: bytes
    reason: SaveReason
    created_ns: int
    checksum: int
    size: int
    payload: Payload

    def view(self) -> memoryview:
        """A read-only view of the payload bytes (no copy)."""
        return payload_view(self.payload).toreadonly()


class RamStore:
    """Thread-safe map from cache key to `RamEntry`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[bytes, RamEntry] = {}

    def put(self, entry: RamEntry) -> None:
        """Insert or replace (the old payload is released)."""
        with self._lock:
            old = self._entries.get(entry.key)
            self._entries[entry.key] = entry
        if old is not None and old.payload is not entry.payload:
            release_payload(old.payload)

    def get(self, key: bytes) -> RamEntry | None:
        """The entry for `key`, or None."""
        with self._lock:
            return self._entries.get(key)

    def pop(self, key: bytes) -> RamEntry | None:
        """Remove and return the entry without releasing its payload (the caller owns it now)."""
        with self._lock:
            return self._entries.pop(key, None)

    def delete(self, key: bytes) -> None:
        """Remove the entry and release its payload."""
        entry = self.pop(key)
        if entry is not None:
            release_payload(entry.payload)

    def entries(self) -> Iterator[RamEntry]:
        """A snapshot of every entry."""
        with self._lock:
            items = list(self._entries.values())
        return iter(items)

    def total_bytes(self) -> int:
        """Sum of payload sizes."""
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        """Release every payload."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            release_payload(entry.payload)
