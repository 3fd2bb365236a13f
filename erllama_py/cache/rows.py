"""The records the cache index keeps and hands out: rows, reservations, claims, infos."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from erllama_py.cache.key import Namespace, key_hex
from erllama_py.kinds import SaveReason, TierKind
from erllama_py.params import JSON

__all__ = [
    "Announcement",
    "Claim",
    "PrefixHit",
    "Reservation",
    "ReserveRequest",
    "Row",
    "RowInfo",
    "Stage",
]

Stage = Literal["pre_link", "post_link"]


@dataclass
class Row:
    """An available copy of a cached state in one tier."""

    key: bytes
    tier: str
    kind: TierKind
    namespace: Namespace
    tokens: bytes
    size: int
    reason: SaveReason
    created_ns: int
    path: Path | None = None
    checksum: int | None = None
    hits: int = 0
    last_used: float = 0.0
    # Invariant: refcount > 0 (pinned by a reader between claim and checkin) => never evicted.
    refcount: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) // 4


@dataclass(frozen=True)
class ReserveRequest:
    """A writer's request to publish a row: (key, tier), its bytes and what it holds."""

    key: bytes
    tier: str
    namespace: Namespace
    tokens: bytes
    size: int
    reason: SaveReason
    writer: str


@dataclass(frozen=True)
class Announcement:
    """A reserved row is published: its final size (an adopted file's may differ), path,
    payload checksum and creation time (None: now)."""

    key: bytes
    tier: str
    token: int
    size: int
    path: Path | None = None
    checksum: int | None = None
    created_ns: int | None = None


@dataclass
class Reservation:
    """The right of one writer to publish (key, tier); counted against the tier's quota."""

    key: bytes
    tier: str
    token: int
    writer: str
    size: int
    namespace: Namespace
    tokens: bytes
    reason: SaveReason
    expires: float
    stage: Stage = "pre_link"
    path: Path | None = None
    temp_path: Path | None = None


@dataclass(frozen=True)
class RowInfo:
    """A public, immutable description of a row (or of a save in flight)."""

    key: bytes
    tier: str
    kind: TierKind
    n_tokens: int
    size: int
    hits: int
    refcount: int
    status: Literal["available", "writing"]
    reason: SaveReason
    created_ns: int
    path: Path | None

    @property
    def key_hex(self) -> str:
        return key_hex(self.key)

    def to_dict(self) -> dict[str, JSON]:
        """JSON-serialisable form."""
        return {
            "key": self.key_hex,
            "tier": self.tier,
            "kind": str(self.kind),
            "tokens": self.n_tokens,
            "bytes": self.size,
            "hits": self.hits,
            "refcount": self.refcount,
            "status": self.status,
            "reason": str(self.reason),
            "created_ns": self.created_ns,
            "path": str(self.path) if self.path else None,
        }


@dataclass(frozen=True)
class Claim:
    """A pinned row: load it, then check it in. `holder` identifies the pin."""

    holder: int
    key: bytes
    tier: str
    kind: TierKind
    namespace: Namespace
    tokens: bytes
    size: int
    reason: SaveReason
    path: Path | None
    checksum: int | None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) // 4


@dataclass(frozen=True)
class PrefixHit:
    """Result of a longest-prefix lookup.

    ``covered`` is the longest row whose whole token list is a prefix of the
    prompt (restore it, prefill the rest). ``common`` is the row achieving the
    longest common prefix ``common_len`` with the prompt (restore it, cut it
    back to ``common_len``, still token-exact). Either may be None.
    """

    covered: RowInfo | None
    common: RowInfo | None
    common_len: int
