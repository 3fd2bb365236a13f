"""Shared-memory buffers for a sequence's saved state, and their byte format.

A :class:`StateBuffer` is an anonymous Linux ``memfd`` plus one shared
``mmap`` of it. The context worker packs a sequence into a fresh buffer and
passes the fd (over a Unix socket, ``SCM_RIGHTS``) to the runtime, which can
map the same pages without a copy; a buffer sent the other way is restored by
llama.cpp straight from the mapping. Memfds have no name, so nothing can leak
in ``/dev/shm``: the memory goes away when the last fd and mapping close.
Python's ``mmap`` keeps a private ``dup`` of the fd, so an open buffer holds
two descriptors; :meth:`StateBuffer.close` releases both and the mapping.

Byte format (version 1, all integers little-endian)::

    offset  size  type     field
    0       8     bytes    magic b"ERLKVST\\0"
    8       2     u16      version (1)
    10      2     u16      kind: 1 = llama.cpp sequence state, 2 = stub token list
    12      4     u32      flags: bit 0 = the logits section is present
    16      8     u64      n_tokens: positions held by the state (the sequence length)
    24      4     u32      n_vocab
    28      4     u32      reserved, 0
    32      8     u64      logits_len: bytes of logits (4 * n_vocab if bit 0, else 0)
    40      8     u64      state_len: bytes of the state section
    48      16    -        reserved, 0
    64      L     f32[]    the logits of the last position (float32 x n_vocab)
    64 + L  S     bytes    the state: ``llama_state_seq_get_data`` output, or for
                           kind 2 the sequence's token ids as u32

The strict parser (:func:`parse_header`) rejects a short buffer, a wrong
magic, another version or kind, non-zero reserved fields, a logits length
that disagrees with ``n_vocab`` and the flag, and any size other than exactly
``64 + L + S``, each with :class:`~erllama_py.errors.CacheFormatError`. The
logits section starts at offset 64, so it is 64-byte aligned in a mapping.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import numpy as np

from erllama_py.errors import CacheFormatError

__all__ = [
    "FLAG_LOGITS",
    "HEADER_SIZE",
    "KIND_LLAMA",
    "KIND_STUB",
    "MAGIC",
    "VERSION",
    "Allocate",
    "PackTarget",
    "StateBuffer",
    "StateHeader",
    "buffer_address",
    "encode_header",
    "logits_of",
    "parse_header",
]

MAGIC = b"ERLKVST\x00"
VERSION = 1
KIND_LLAMA = 1
KIND_STUB = 2
FLAG_LOGITS = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sHHIQIIQQ16s")
assert _HEADER.size == HEADER_SIZE
assert sys.byteorder == "little"  # logits are written as native float32


@dataclass(frozen=True, slots=True)
class StateHeader:
    """The parsed fixed header of a packed sequence state."""

    kind: int
    n_tokens: int
    n_vocab: int
    logits_len: int
    state_len: int
    flags: int = 0
    version: int = VERSION

    @property
    def has_logits(self) -> bool:
        """True when the buffer carries the last position's logits."""
        return bool(self.flags & FLAG_LOGITS)

    @property
    def logits_offset(self) -> int:
        """Offset of the logits section (always :data:`HEADER_SIZE`)."""
        return HEADER_SIZE

    @property
    def state_offset(self) -> int:
        """Offset of the state section."""
        return HEADER_SIZE + self.logits_len

    @property
    def total_size(self) -> int:
        """Exact size of the whole buffer."""
        return HEADER_SIZE + self.logits_len + self.state_len


def encode_header(h: StateHeader) -> bytes:
    """Return the 64 header bytes for ``h``."""
    return _HEADER.pack(
        MAGIC,
        h.version,
        h.kind,
        h.flags,
        h.n_tokens,
        h.n_vocab,
        0,
        h.logits_len,
        h.state_len,
        b"\x00" * 16,
    )


def parse_header(data: memoryview | bytes | bytearray, size: int | None = None) -> StateHeader:
    """Parse and validate the header of a packed state (strict, see the module doc).

    ``size`` is the size of the whole buffer (default ``len(data)``). Raises
    :class:`CacheFormatError` with reason ``truncated``, ``bad_magic``,
    ``unsupported_version``, ``bad_kind``, ``bad_header``, ``bad_logits`` or
    ``trailing_bytes``.
    """
    total = len(data) if size is None else size
    if total < HEADER_SIZE:
        raise CacheFormatError("truncated", f"{total} bytes is shorter than the header")
    magic, version, kind, flags, n_tokens, n_vocab, res1, logits_len, state_len, res2 = (
        _HEADER.unpack_from(data, 0)
    )
    if magic != MAGIC:
        raise CacheFormatError("bad_magic", repr(bytes(magic)))
    if version != VERSION:
        raise CacheFormatError("unsupported_version", str(version))
    if kind not in (KIND_LLAMA, KIND_STUB):
        raise CacheFormatError("bad_kind", str(kind))
    if res1 != 0 or res2 != b"\x00" * 16 or flags & ~FLAG_LOGITS:
        raise CacheFormatError("bad_header", "reserved fields or unknown flags are set")
    want_logits = 4 * n_vocab if flags & FLAG_LOGITS else 0
    if logits_len != want_logits:
        raise CacheFormatError("bad_logits", f"logits_len {logits_len}, expected {want_logits}")
    h = StateHeader(kind, n_tokens, n_vocab, logits_len, state_len, flags, version)
    if total < h.total_size:
        raise CacheFormatError("truncated", f"{total} bytes, header says {h.total_size}")
    if total > h.total_size:
        raise CacheFormatError("trailing_bytes", f"{total} bytes, header says {h.total_size}")
    return h


def logits_of(data: memoryview | bytes | bytearray, h: StateHeader) -> np.ndarray:
    """A read-only float32 view of the logits section (empty if there is none)."""
    arr = np.frombuffer(data, dtype=np.float32, count=h.logits_len // 4, offset=HEADER_SIZE)
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True)
class PackTarget:
    """Where a backend packs a state: a writable view of exactly the packed size and the
    address of its first byte (valid while `view` is). `release` drops the view."""

    view: memoryview
    address: int

    def release(self) -> None:
        self.view.release()


Allocate = Callable[[int], PackTarget]
"""Given a packed state's size, the place to pack it (a fresh buffer, an arena slot)."""


def buffer_address(data: Any) -> tuple[int, Any]:
    """Return ``(address, keepalive)`` of a bytes-like object's first byte.

    The address stays valid while ``keepalive`` is referenced (and, for a
    :class:`StateBuffer`, while it is open). Works for read-only buffers too.
    """
    if isinstance(data, StateBuffer):
        return data.address, data
    arr = np.frombuffer(data, dtype=np.uint8)
    return int(arr.ctypes.data), arr


class StateBuffer:
    """A memfd and its shared mapping; closed deterministically.

    Use as a context manager or call :meth:`close`: that releases the
    mapping at once (and invalidates :meth:`view`). A buffer that is only
    garbage-collected closes its fd, and its mapping goes with the last view
    still held. ``fd`` can be sent to another process, which opens it with
    :meth:`from_fd`. Not thread-safe.
    """

    __slots__ = ("_address", "_closed", "_fd", "_mmap", "_owns_fd", "_size", "_view", "_writable")

    def __init__(self, fd: int, size: int, writable: bool, owns_fd: bool) -> None:
        """Map ``fd``; prefer :meth:`create` and :meth:`from_fd`."""
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        st_size = os.fstat(fd).st_size
        if st_size < size:
            # Touching a mapping beyond the end of the file is SIGBUS, not an exception.
            raise CacheFormatError("truncated", f"fd holds {st_size} bytes, {size} requested")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        self._fd = fd
        self._size = size
        self._writable = writable
        self._owns_fd = owns_fd
        self._closed = False
        self._view: memoryview | None = memoryview(self._mmap)
        # Read the address once through a temporary export, then drop the
        # export so that close() never meets a lingering one of ours.
        probe = np.frombuffer(self._mmap, dtype=np.uint8, count=1)
        self._address = int(probe.ctypes.data)
        del probe

    @classmethod
    def create(cls, size: int) -> Self:
        """A new zero-filled, writable, sealable memfd of ``size`` bytes.

        Raises ``ValueError`` for a non-positive size and ``OSError`` when the
        kernel refuses the memory.
        """
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        fd = os.memfd_create("erllama-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, writable=True, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(
        cls, fd: int, size: int | None = None, writable: bool = False, take_ownership: bool = False
    ) -> Self:
        """Map an existing memfd (or any regular file) of at least ``size`` bytes.

        By default the buffer works on a ``dup`` of ``fd`` and the caller keeps
        (and must close) its own descriptor; with ``take_ownership=True`` the
        buffer closes ``fd`` itself in :meth:`close` (also if mapping fails).
        ``size`` defaults to the file size. Raises ``CacheFormatError``
        (``truncated``) when the file is shorter than ``size``.
        """
        own = fd if take_ownership else os.dup(fd)
        try:
            if size is None:
                size = os.fstat(own).st_size
            return cls(own, size, writable=writable, owns_fd=True)
        except BaseException:
            os.close(own)
            raise

    @property
    def fd(self) -> int:
        """The memfd (send it to another process to share the pages)."""
        self._check()
        return self._fd

    @property
    def size(self) -> int:
        """Size of the mapping in bytes."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether the mapping is writable."""
        return self._writable

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def address(self) -> int:
        """Address of the first mapped byte, for C calls; valid until :meth:`close`."""
        self._check()
        return self._address

    def view(self) -> memoryview:
        """The whole mapping as a memoryview (the same object on every call).

        Release any slices or numpy arrays made from it before :meth:`close`.
        """
        self._check()
        assert self._view is not None
        return self._view

    def ctypes_array(self, offset: int, length: int) -> ctypes.Array[ctypes.c_char]:
        """A ctypes ``c_char`` array over ``[offset, offset + length)`` (no copy).

        Only for writable buffers; the array is an export of the mapping:
        delete it before :meth:`close`.
        """
        self._check()
        if not self._writable:
            raise ValueError("ctypes_array needs a writable buffer; use address for reads")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError("range outside the buffer")
        return (ctypes.c_char * length).from_buffer(self._mmap, offset)

    def seal(self) -> None:
        """Forbid growing and shrinking the memfd (``F_SEAL_SHRINK | F_SEAL_GROW``).

        A process that maps a sealed buffer cannot be hit by SIGBUS from a
        later truncation. Does nothing for an fd that does not allow sealing.
        """
        self._check()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)

    def target(self, offset: int = 0, length: int | None = None) -> PackTarget:
        """A `PackTarget` over ``[offset, offset + length)`` (default: to the end)."""
        self._check()
        end = self._size if length is None else offset + length
        if offset < 0 or end > self._size or end <= offset:
            raise ValueError("range outside the buffer")
        return PackTarget(self.view()[offset:end], self._address + offset)

    def discard(self, offset: int, length: int) -> None:
        """Give the pages of ``[offset, offset + length)`` back to the kernel
        (``MADV_REMOVE``: they read as zeros afterwards). Page-aligned ranges only."""
        self._check()
        if offset % mmap.PAGESIZE or length % mmap.PAGESIZE or offset + length > self._size:
            raise ValueError("discard needs a page-aligned range inside the buffer")
        with contextlib.suppress(OSError):  # a mapping that cannot remove keeps its pages
            self._mmap.madvise(mmap.MADV_REMOVE, offset, length)

    def close(self) -> None:
        """Unmap and close the descriptors (idempotent).

        Raises ``BufferError`` (and stays open) while views made from
        :meth:`view` or :meth:`ctypes_array` are still alive.
        """
        if self._closed:
            return
        if self._view is not None:
            self._view.release()
            self._view = None
        try:
            self._mmap.close()
        except BufferError:
            self._view = memoryview(self._mmap)
            raise BufferError(
                "StateBuffer still has views or arrays over its mapping; release them first"
            ) from None
        self._closed = True
        if self._owns_fd:
            os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Collected without close(): close our fd but do not release views a
        # caller may still hold (``StateBuffer.create(n).view()`` on a
        # temporary); the mapping and mmap's own fd go with the last of them.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._owns_fd:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<StateBuffer {state} size={self._size}>"

    def _check(self) -> None:
        if self._closed:
            raise ValueError("StateBuffer is closed")
