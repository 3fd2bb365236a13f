"""Shared-memory arenas for saved states: a few large memfds carved into slots.

A RAM row used to own a memfd and its mapping (two descriptors), so the
descriptors a runtime held grew with its rows and a few hundred cached
prompts exhausted the common soft limit of 1,024. Now every state a worker
packs, and every row promoted to RAM, is a slot of an `Arena`: a handful of
*segments*, each a memfd (sparse: only the pages of live slots hold memory)
mapped once here and once in each worker. A worker is sent a segment's
descriptor the first time a command names it (`SlotRef.fd_follows`), then
packs into and restores from ``(segment, offset, size)`` slices of its own
mapping, so saves and restores stay zero-copy and cost no descriptor.

The descriptors held are two per segment (the memfd and ``mmap``'s dup),
at most ``2 * max_segments`` here, whatever the number of rows. A freed
slot's pages go back to the kernel at once (``MADV_REMOVE``), so the memory
held is that of the live slots, rounded up to whole pages.

Segments are never closed before the arena (`Arena.close`, called by
``rt.stop()``): a worker may map any of them, and a segment id always names
the same memfd, so a worker's mapping is never stale.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import threading
from dataclasses import dataclass

from erllama_py.model.statebuf import StateBuffer

__all__ = [
    "DEFAULT_MAX_SEGMENTS",
    "DEFAULT_SEGMENT_BYTES",
    "PAGE",
    "Arena",
    "ArenaFullError",
    "ArenaSlice",
    "FreeList",
    "SlotRef",
    "segments_for",
]

PAGE = 4096
DEFAULT_SEGMENT_BYTES = 1 << 30  # virtual size of a segment (sparse: costs no memory)
DEFAULT_MAX_SEGMENTS = 32
_segment_ids = itertools.count(1)  # unique in the process, so ids never name two memfds


def segments_for(ram_quota_bytes: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> int:
    """How many segments an arena may make for a RAM tier of `ram_quota_bytes`: room for
    the tier twice over (free space left between slots, and the states packed for file
    tiers that are in flight beside it), and never fewer than `DEFAULT_MAX_SEGMENTS`."""
    whole = -(-ram_quota_bytes // segment_bytes)
    return max(DEFAULT_MAX_SEGMENTS, 2 * whole + 2)


class ArenaFullError(OSError):
    """No segment has room for a slot and no new segment may be made."""

    def __init__(self, size: int, segments: int) -> None:
        super().__init__(
            errno.ENOMEM, f"no arena room for {size} bytes ({segments} segments in use)"
        )


class FreeList:
    """First-fit allocation of page-aligned blocks of ``[0, capacity)``, merging freed
    neighbours. Invariant: `_starts` is sorted, blocks neither overlap nor touch."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._starts: list[int] = [0]
        self._lengths: dict[int, int] = {0: capacity}
        self.free_bytes = capacity

    def allocate(self, length: int) -> int | None:
        """The offset of a free block of `length` bytes (a multiple of `PAGE`), or None."""
        for i, start in enumerate(self._starts):
            have = self._lengths[start]
            if have < length:
                continue
            del self._lengths[start]
            if have == length:
                del self._starts[i]
            else:
                self._starts[i] = start + length
                self._lengths[start + length] = have - length
            self.free_bytes -= length
            return start
        return None

    def free(self, start: int, length: int) -> None:
        """Give back a block `allocate` returned."""
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start:
            raise ValueError(f"block at {start} is already free")
        end = start + length
        if i < len(self._starts) and self._starts[i] == end:  # merge with the next block
            length += self._lengths.pop(end)
            del self._starts[i]
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._lengths[prev] == start:  # merge with the previous block
                self._lengths[prev] += length
                self.free_bytes += end - start
                return
        self._starts.insert(i, start)
        self._lengths[start] = length
        self.free_bytes += end - start

    def blocks(self) -> list[tuple[int, int]]:
        """The free blocks, as (offset, length), in address order."""
        return [(s, self._lengths[s]) for s in self._starts]


@dataclass(frozen=True)
class SlotRef:
    """A slice of a segment, as a worker command names it; with ``fd_follows`` the
    segment's descriptor follows the command (the worker has not mapped it yet)."""

    segment: int
    segment_size: int
    offset: int
    size: int
    fd_follows: bool = False


class _Segment:
    def __init__(self, size: int) -> None:
        self.id = next(_segment_ids)
        self.buffer = StateBuffer.create(size)
        self.free = FreeList(size)

    @property
    def size(self) -> int:
        return self.buffer.size


class ArenaSlice:
    """One slot of an arena: a cache payload (``view()``, ``close()``) that a worker can
    pack into or restore from without a copy. `close` returns the slot (idempotent).

    The arena's readers pin a row while they read it, so a slot is never freed under
    a reader; the checksum verified on every load catches a slot written to meanwhile.
    """

    __slots__ = ("_arena", "_closed", "_segment", "capacity", "offset", "size")

    def __init__(
        self, arena: Arena, segment: _Segment, offset: int, size: int, capacity: int
    ) -> None:
        self._arena = arena
        self._segment = segment
        self.offset = offset
        self.size = size
        self.capacity = capacity
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def segment_id(self) -> int:
        return self._segment.id

    @property
    def segment_fd(self) -> int:
        """The segment's memfd (to send to a worker once)."""
        return self._segment.buffer.fd

    def ref(self, fd_follows: bool = False) -> SlotRef:
        """How a worker command names this slice."""
        return SlotRef(self._segment.id, self._segment.size, self.offset, self.size, fd_follows)

    def view(self) -> memoryview:
        """The slot's bytes, writable (a new slice of the segment's mapping)."""
        if self._closed:
            raise ValueError("ArenaSlice is closed")
        return self._segment.buffer.view()[self.offset : self.offset + self.size]

    def close(self) -> None:
        """Give the slot back to the arena (its pages are freed)."""
        if self._closed:
            return
        self._closed = True
        self._arena._free(self._segment, self.offset, self.capacity)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"segment={self._segment.id}"
        return f"<ArenaSlice {state} offset={self.offset} size={self.size}>"


class Arena:
    """Thread-safe slot allocator over up to `max_segments` memfd segments."""

    def __init__(
        self,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_segments: int = DEFAULT_MAX_SEGMENTS,
    ) -> None:
        if segment_bytes <= 0 or segment_bytes % PAGE or max_segments <= 0:
            raise ValueError("segment_bytes must be a positive multiple of 4096, max_segments > 0")
        self.segment_bytes = segment_bytes
        self.max_segments = max_segments
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._closed = False
        self.live_slots = 0
        self.live_bytes = 0

    def allocate(self, size: int) -> ArenaSlice:
        """A slot of `size` bytes (zero-filled only if never used before).

        Raises:
            ValueError: a non-positive size, or the arena is closed.
            ArenaFullError: no room and `max_segments` segments exist.
            OSError: the kernel refused a new segment (EMFILE, ENOMEM).
        """
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        capacity = -(-size // PAGE) * PAGE
        with self._lock:
            if self._closed:
                raise ValueError("the arena is closed")
            for segment in self._segments:
                offset = segment.free.allocate(capacity)
                if offset is not None:
                    return self._slice(segment, offset, size, capacity)
            if len(self._segments) >= self.max_segments:
                raise ArenaFullError(size, len(self._segments))
            # A row bigger than a segment gets a segment of its own size.
            segment = _Segment(max(self.segment_bytes, capacity))
            self._segments.append(segment)
            offset = segment.free.allocate(capacity)
            assert offset == 0
            return self._slice(segment, offset, size, capacity)

    def _slice(self, segment: _Segment, offset: int, size: int, capacity: int) -> ArenaSlice:
        self.live_slots += 1
        self.live_bytes += capacity
        return ArenaSlice(self, segment, offset, size, capacity)

    def _free(self, segment: _Segment, offset: int, capacity: int) -> None:
        with self._lock:
            if self._closed or segment.buffer.closed:
                return
            segment.buffer.discard(offset, capacity)
            segment.free.free(offset, capacity)
            self.live_slots -= 1
            self.live_bytes -= capacity

    @property
    def segments(self) -> int:
        """How many segments exist (each holds two descriptors)."""
        with self._lock:
            return len(self._segments)

    def close(self) -> None:
        """Close every segment (idempotent); slices still alive become unusable."""
        with self._lock:
            self._closed = True
            segments, self._segments = self._segments, []
            self.live_slots = self.live_bytes = 0
        for segment in segments:
            # A caller still holding a view keeps that mapping until it lets go.
            with contextlib.suppress(BufferError):
                segment.buffer.close()
