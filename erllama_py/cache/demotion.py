"""A file row on its way to the next tier: its payload, mapped from the file it leaves.

When a ``ram_file`` (or ``disk``) row is evicted and a slower tier follows, the
meta actor maps the row's payload and unlinks the file at once (the tier's
name and quota are free again); the mapping keeps the bytes readable until a
writer has framed them into the next tier, which also checks them against the
checksum the file was published with. A process that dies meanwhile loses only
that row: the kernel frees an unlinked file with its last mapping.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

from erllama_py.cache import kvc
from erllama_py.errors import CacheFormatError

__all__ = ["MappedRow"]


class MappedRow:
    """The payload of a row file, read-only and mapped (a `SharedBuffer` that owns memory)."""

    def __init__(self, header: kvc.RowHeader, mapping: mmap.mmap) -> None:
        self.header = header
        self._mapping = mapping

    @classmethod
    def open(cls, path: Path, key: bytes) -> MappedRow:
        """Map the payload of the row file at `path` (its prefix is checked, and its key).

        Raises:
            CacheFormatError: the prefix is invalid or names another key.
            OSError: the file cannot be opened or mapped.
        """
        header = kvc.read_prefix_file(path)
        if header.key != key:
            raise CacheFormatError("key_mismatch", f"file has {header.key.hex()}", str(path))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mapping = mmap.mmap(fd, header.file_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(header, mapping)

    def view(self) -> memoryview:
        start = self.header.payload_offset
        return memoryview(self._mapping)[start : start + self.header.payload_len]

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._mapping.close()
