"""I/O the meta actor performs after the index commits a change (as diskcache removes
obsolete files only after its transaction commits)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erllama_py.cache.rows import Reservation, Row

__all__ = ["Action", "Adopt", "Demote", "Drop", "PersistHits", "RemoveTemp"]


@dataclass(frozen=True)
class Drop:
    """Delete this row's data (file or RAM entry); it has left the index."""

    row: Row


@dataclass(frozen=True)
class Demote:
    """Move this row's payload to a slower tier (the first of `targets` with room)."""

    row: Row
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Adopt:
    """A writer vanished: if its final file exists, validate and install it, or delete it."""

    reservation: Reservation


@dataclass(frozen=True)
class RemoveTemp:
    """A writer vanished before linking: remove its temp file if it left one."""

    path: Path


@dataclass(frozen=True)
class PersistHits:
    """Write the new hit count into the row's file header (best effort)."""

    path: Path
    hits: int


Action = Drop | Demote | Adopt | RemoveTemp | PersistHits
