"""A small pool of shared buffers for restores read from file tiers.

A fresh 15 MB memfd costs a page allocation per 4 KiB page, about 10 ms here:
more than reading the row from the page cache and restoring it together. A
model that restores from a file tier without promoting the row to RAM
(no RAM tier, or ``promote_on_hit: false``) gives its buffer back after the
restore, and the next restore reuses it; the worker's mapping cache then
knows it too. Buffers are sized up to a whole MiB so that states of nearby
lengths share them.
"""

from __future__ import annotations

import contextlib
import threading

from erllama_py.model.statebuf import StateBuffer

__all__ = ["BufferPool"]

MIB = 1024 * 1024
DEFAULT_MAX_BYTES = 256 * MIB  # free buffers kept
DEFAULT_MAX_BUFFERS = 4


class BufferPool:
    """Free `StateBuffer`s by capacity; thread-safe."""

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, max_buffers: int = DEFAULT_MAX_BUFFERS
    ) -> None:
        self.max_bytes = max_bytes
        self.max_buffers = max_buffers
        self._free: list[StateBuffer] = []
        self._lock = threading.Lock()

    def acquire(self, size: int) -> StateBuffer:
        """A buffer of at least `size` bytes (at most twice that), reused or new."""
        with self._lock:
            fits = [b for b in self._free if size <= b.size <= 2 * size and not b.closed]
            if fits:
                best = min(fits, key=lambda b: b.size)
                self._free.remove(best)
                return best
        return StateBuffer.create(-(-size // MIB) * MIB)

    def release(self, buffer: StateBuffer) -> None:
        """Give a buffer back (kept if the pool has room, else closed)."""
        if buffer.closed:
            return
        with self._lock:
            held = sum(b.size for b in self._free)
            if len(self._free) < self.max_buffers and held + buffer.size <= self.max_bytes:
                self._free.append(buffer)
                return
        with contextlib.suppress(BufferError):
            buffer.close()

    def clear(self) -> None:
        """Close every free buffer."""
        with self._lock:
            free, self._free = self._free, []
        for buffer in free:
            with contextlib.suppress(BufferError):
                buffer.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._free)
