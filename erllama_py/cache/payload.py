"""What a cache row's payload may be, and the three things done with one.

A payload is an immutable ``bytes``, a caller's buffer (``bytearray``,
``memoryview``: copied before the RAM tier keeps it), or a shared buffer that
owns memory (anything with ``view()`` and ``close()``, such as a model's
`StateBuffer`), which the cache keeps by reference and closes when the row goes.
"""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import xxhash

__all__ = [
    "Payload",
    "SharedBuffer",
    "has_checksum",
    "payload_checksum",
    "payload_view",
    "release_payload",
]


@runtime_checkable
class SharedBuffer(Protocol):
    """A buffer whose bytes are read through ``view()``; if it owns memory it also has
    ``close()``, which the cache calls when it lets the payload go."""

    def view(self) -> memoryview: ...


@runtime_checkable
class _Closeable(Protocol):
    def close(self) -> None: ...


Payload = bytes | bytearray | memoryview | SharedBuffer


def payload_view(payload: Payload) -> memoryview:
    """The payload's bytes as a flat byte view (no copy)."""
    # memoryview() of what view() returns: NumPy arrays have a view() method of their own.
    raw = memoryview(payload.view() if isinstance(payload, SharedBuffer) else payload)
    return raw if raw.format == "B" and raw.ndim == 1 else raw.cast("B")


def payload_checksum(payload: Payload) -> int:
    """xxh3-64 of a payload's bytes."""
    return int(xxhash.xxh3_64_intdigest(payload_view(payload)))


def has_checksum(payload: Payload, checksum: int) -> bool:
    """Whether a payload's bytes still have the checksum they were published with."""
    return payload_checksum(payload) == checksum


def release_payload(payload: Payload) -> None:
    """Close a payload that owns memory; plain bytes need nothing."""
    if isinstance(payload, SharedBuffer) and isinstance(payload, _Closeable):
        # A reader still holding a view keeps the memory alive; it goes with the last view.
        with contextlib.suppress(BufferError):
            payload.close()
