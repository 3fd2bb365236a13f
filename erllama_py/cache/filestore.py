"""One file tier's directory (``ram_file`` on tmpfs, or ``disk``): paths, scan, load, publish.

A row lives in ``<root>/<key hex>.kvc``; a save in flight writes
``<root>/<key hex>.kvc.<pid>.<writer>.<token>.tmp`` in the same directory, so the
final ``link(2)`` never crosses file systems. The process id keeps two processes
sharing a root from ever choosing the same temp name (their writer names and
tokens coincide), as the original's ``<writer pid>.<unique int>`` did.

Loads run in the caller's thread (the row is pinned by its claim, so it cannot
be evicted meanwhile) and read into one fresh buffer; files are never mapped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erllama_py.cache import kvc
from erllama_py.cache.key import key_hex
from erllama_py.cache.rootlock import LOCK_NAME
from erllama_py.cache.rows import Row
from erllama_py.config import TierSettings
from erllama_py.errors import CacheFormatError

__all__ = ["FileStore", "ScanResult", "fsync_dir", "write_all"]

ROW_SUFFIX = ".kvc"
TEMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (a link or unlink in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, buffers: list[Any]) -> int:
    """`os.writev` until every byte of every buffer is written; returns the total.

    Partial writes are resumed from where they stopped, without joining buffers.
    """
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    total = 0
    while views:
        written = os.writev(fd, views)
        total += written
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
    return total


@dataclass
class ScanResult:
    """What a scan of one tier directory found."""

    rows: list[Row] = field(default_factory=list)
    corrupt: list[tuple[Path, str]] = field(default_factory=list)
    temps_removed: int = 0
    renamed: int = 0


class FileStore:
    """Paths and file operations of one file tier."""

    def __init__(self, tier: TierSettings, *, verify_on_scan: bool = False) -> None:
        if tier.root is None:
            raise ValueError(f"tier {tier.name} has no root")
        self.tier = tier
        self.name = tier.name
        self.kind = tier.kind
        self.root: Path = tier.root
        self.verify_on_scan = verify_on_scan

    def final_path(self, key: bytes) -> Path:
        """Where the row of `key` is published."""
        return self.root / f"{key_hex(key)}{ROW_SUFFIX}"

    def temp_path(self, key: bytes, writer: str, token: int) -> Path:
        """A temp file name unique to one reservation of one process."""
        safe_writer = "".join(c if c.isalnum() else "-" for c in writer)
        stem = f"{key_hex(key)}{ROW_SUFFIX}.{os.getpid()}.{safe_writer}.{token}"
        return self.root / f"{stem}{TEMP_SUFFIX}"

    # ------------------------------------------------------------------ scan

    def sweep_temps(self, older_than_s: float | None = None) -> int:
        """Delete temp files (all, or those not modified for `older_than_s` seconds)."""
        removed = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.endswith(TEMP_SUFFIX):
                continue
            try:
                if older_than_s is not None and now - entry.stat().st_mtime < older_than_s:
                    continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    def scan(self) -> ScanResult:
        """Sweep temp files, validate every row file, return the valid rows.

        Each file's key is recomputed from its content (never trusted from its
        name); a valid file under the wrong name is renamed. Corrupt files are
        deleted and reported. With ``verify_on_scan`` the payload checksum is
        verified too (a full read); otherwise it is verified at load.
        """
        result = ScanResult(temps_removed=self.sweep_temps())
        self.root.mkdir(parents=True, exist_ok=True)
        entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        names = {e.name for e in entries}
        for entry in entries:
            if not entry.name.endswith(ROW_SUFFIX) or not entry.is_file(follow_symlinks=False):
                continue
            path = Path(entry.path)
            try:
                if self.verify_on_scan:
                    header, _ = kvc.read_file(path)
                else:
                    header = kvc.read_prefix_file(path)
            except CacheFormatError as exc:
                result.corrupt.append((path, exc.reason))
                self.delete(path)
                continue
            except OSError:
                continue
            final = self.final_path(header.key)
            if final != path:
                # A valid row under a wrong name: the correctly named file, if any, wins.
                if final.name in names:
                    self.delete(path)
                    continue
                try:
                    os.link(path, final)
                except FileExistsError:
                    self.delete(path)
                    continue
                self.delete(path)
                result.renamed += 1
                path = final
            result.rows.append(self.row_from_header(header, path))
        return result

    def row_from_header(self, header: kvc.RowHeader, path: Path) -> Row:
        """An index row for a validated file."""
        return Row(
            key=header.key,
            tier=self.name,
            kind=self.kind,
            namespace=header.namespace,
            tokens=header.token_bytes,
            size=header.file_size,
            reason=header.reason,
            created_ns=header.created,
            path=path,
            checksum=header.payload_checksum,
            hits=header.hit_count,
        )

    def validate(self, path: Path, key: bytes) -> Row:
        """Fully verify a file (payload checksum included) and return its row.

        Raises:
            CacheFormatError: invalid; OSError: unreadable.
        """
        header, _ = kvc.read_file(path, expected_key=key)
        return self.row_from_header(header, path)

    # ------------------------------------------------------------------ load / delete

    def load(
        self,
        path: Path,
        key: bytes,
        allocate: Callable[[int], Any] | None = None,
    ) -> memoryview:
        """Read and verify a row's payload into one buffer from `allocate` (default bytearray).

        Raises:
            CacheFormatError: the file is corrupt (checksum, key, size).
            OSError: the file is missing or unreadable.
        """
        _, payload = kvc.read_file(path, expected_key=key, allocate=allocate)
        return payload

    def delete(self, path: Path) -> None:
        """Unlink a file; a file already gone is fine."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def persist_hits(self, path: Path, hits: int) -> None:
        """Best-effort rewrite of a file's hit count."""
        kvc.write_hit_count(path, hits)

    def usage(self) -> tuple[int, int]:
        """(row files, bytes) actually on disk, temp files included in bytes."""
        files = total = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0, 0
        for entry in entries:
            if entry.name == LOCK_NAME:  # the runtime's root lock (cache/rootlock.py)
                continue
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            total += size
            files += entry.name.endswith(ROW_SUFFIX)
        return files, total

    # ------------------------------------------------------------------ publish steps

    def write_temp(self, path: Path, prefix: bytes, payload: Any) -> int:
        """Create `path` exclusively, write prefix and payload, data-sync, close.

        On any error the temp file is removed and the error raised.
        """
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            size = write_all(fd, [prefix, payload])
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            self.delete(path)
            raise
        os.close(fd)
        return size

    def link(self, temp: Path, key: bytes) -> tuple[Path, int, bool]:
        """Publish `temp` under the key's final name with ``link(2)``.

        Returns (final path, final size, adopted). An existing final file is
        validated: a valid one is adopted (ours is discarded: first file wins),
        an invalid one is replaced; EEXIST is never skipped.

        Raises:
            OSError: the link failed twice (the temp file is removed).
        """
        final = self.final_path(key)
        adopted = False
        try:
            os.link(temp, final)
        except FileExistsError:
            try:
                self.validate(final, key)
                adopted = True
            except (CacheFormatError, OSError):
                self.delete(final)
                try:
                    os.link(temp, final)
                except OSError:
                    self.delete(temp)
                    raise
        except OSError:
            self.delete(temp)
            raise
        self.delete(temp)
        fsync_dir(self.root)
        return final, os.stat(final).st_size, adopted


def is_enospc(exc: BaseException) -> bool:
    """True for 'no space left on device' (and quota exceeded)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
