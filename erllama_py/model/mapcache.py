"""The worker's cache of mappings of shared state buffers it was sent.

Restoring a RAM row hands the worker the row's memfd; mapping it afresh each
time costs a page fault per 4 KiB page (about 1.5 ms for a 15 MB state here),
more than a third of a warm start. The same row is typically restored again
and again (a repeated prompt, a conversation), so the worker keeps the last
few mappings, keyed by the memfd's identity (device, inode) and size. A
mapping always shows the memfd's current bytes (it is shared), so a cached
one is never stale; the cache only holds memory alive a little longer, within
`max_bytes`.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict

from erllama_py.model.statebuf import StateBuffer

__all__ = ["MappingCache"]

DEFAULT_MAX_BYTES = 128 * 1024 * 1024  # mappings kept alive after their restore
DEFAULT_MAX_ENTRIES = 8


class MappingCache:
    """LRU of `StateBuffer` mappings by memfd identity."""

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._maps: OrderedDict[tuple[int, int, int], StateBuffer] = OrderedDict()
        self._bytes = 0

    def open(self, fd: int, size: int) -> StateBuffer:
        """A read-only mapping of `size` bytes of `fd`; takes ownership of `fd`."""
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino, size)
        cached = self._maps.get(key)
        if cached is not None and not cached.closed:
            os.close(fd)
            self._maps.move_to_end(key)
            return cached
        buffer = StateBuffer.from_fd(fd, size, take_ownership=True)
        if size <= self.max_bytes:
            self._maps[key] = buffer
            self._bytes += size
            self._trim()
        return buffer

    def owns(self, buffer: StateBuffer) -> bool:
        """Whether `buffer` is kept here (its user must not close it)."""
        return any(b is buffer for b in self._maps.values())

    def _trim(self) -> None:
        while self._maps and (self._bytes > self.max_bytes or len(self._maps) > self.max_entries):
            _, old = self._maps.popitem(last=False)
            self._bytes -= old.size
            with contextlib.suppress(BufferError):
                old.close()

    def clear(self) -> None:
        """Drop every mapping."""
        self.max_bytes, saved = 0, self.max_bytes
        self._trim()
        self.max_bytes = saved
