"""Cache counters: every counter of the original (spec 4.16) plus per-tier gauges.

Increments are cheap and thread-safe (one small lock); `snapshot()` returns a
frozen `CounterSnapshot` readable from any thread without touching the meta
actor's mailbox.

``saved_bytes`` / ``loaded_bytes`` count payload bytes stored and loaded;
``save_bytes_copied`` / ``load_bytes_copied`` count how many of them were
copied from one buffer to another on the way (a RAM row kept by reference: 0;
a file written or read: each byte once). The serialisation of the KV state by
llama.cpp into a shared buffer, and back, is the state itself, not a copy.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, fields

from erllama_py.kinds import TierKind
from erllama_py.params import JSON

__all__ = ["COUNTER_NAMES", "CounterSnapshot", "Counters", "TierStats"]

# The original's twenty counters, in its order, then ours.
COUNTER_NAMES: tuple[str, ...] = (
    "hits_exact",
    "hits_resume",
    "misses",
    "saves_cold",
    "saves_continued",
    "saves_finish",
    "saves_evict",
    "saves_shutdown",
    "evictions",
    "corrupt_files",
    "pack_total_ns",
    "load_total_ns",
    "bytes_ram",
    "bytes_ramfile",
    "bytes_disk",
    "duplicate_dropped",
    "hits_longest_prefix",
    "longest_prefix_probes",
    "longest_prefix_ns",
    "saves_dropped",
    # beyond the original
    "hits_prefix",
    "promotions",
    "demotions",
    "quota_refusals",
    "adoptions",
    "temp_files_swept",
    "load_misses",
    "saved_bytes",
    "save_bytes_copied",
    "loaded_bytes",
    "load_bytes_copied",
    # dropped saves by cause (erllama_py.cache.save_failures)
    "save_failed_no_descriptors",
    "save_failed_no_memory",
    "save_failed_no_space",
    "save_failed_not_writable",
    "save_failed_root_missing",
    "save_failed_io_error",
    "foreign_refused",
    "saves_redirected",
)

_GAUGES = frozenset({"bytes_ram", "bytes_ramfile", "bytes_disk"})


@dataclass(frozen=True)
class TierStats:
    """One tier's gauges and counters at the time of the snapshot."""

    name: str
    kind: TierKind
    quota_bytes: int
    bytes: int
    rows: int
    reserved_bytes: int
    hits: int
    evictions: int
    promotions: int
    demotions: int  # rows evicted from this tier and sent on to a slower one
    demotions_in: int = 0  # rows evicted from a faster tier and saved in this one


@dataclass(frozen=True)
class CounterSnapshot:
    """Frozen copy of every counter, plus per-tier statistics."""

    hits_exact: int = 0
    hits_resume: int = 0
    misses: int = 0
    saves_cold: int = 0
    saves_continued: int = 0
    saves_finish: int = 0
    saves_evict: int = 0
    saves_shutdown: int = 0
    evictions: int = 0
    corrupt_files: int = 0
    pack_total_ns: int = 0
    load_total_ns: int = 0
    bytes_ram: int = 0
    bytes_ramfile: int = 0
    bytes_disk: int = 0
    duplicate_dropped: int = 0
    hits_longest_prefix: int = 0
    longest_prefix_probes: int = 0
    longest_prefix_ns: int = 0
    saves_dropped: int = 0
    hits_prefix: int = 0
    promotions: int = 0
    demotions: int = 0
    quota_refusals: int = 0
    adoptions: int = 0
    temp_files_swept: int = 0
    load_misses: int = 0
    saved_bytes: int = 0
    save_bytes_copied: int = 0
    loaded_bytes: int = 0
    load_bytes_copied: int = 0
    save_failed_no_descriptors: int = 0
    save_failed_no_memory: int = 0
    save_failed_no_space: int = 0
    save_failed_not_writable: int = 0
    save_failed_root_missing: int = 0
    save_failed_io_error: int = 0
    # A lookup (parent_key, or any claim) found a row of another namespace: not restored.
    foreign_refused: int = 0
    # A row larger than its tier's whole quota, saved in the next tier that can hold it.
    saves_redirected: int = 0
    tiers: tuple[TierStats, ...] = field(default=())

    def since(self, before: CounterSnapshot) -> CounterSnapshot:
        """How much each counter grew since `before` (gauges and tiers are this snapshot's)."""
        grown = {
            name: getattr(self, name) - (0 if name in _GAUGES else getattr(before, name))
            for name in COUNTER_NAMES
        }
        return CounterSnapshot(**grown, tiers=self.tiers)

    def to_dict(self) -> dict[str, JSON]:
        """JSON-serialisable form: counter name -> value, and ``tiers`` as a list of dicts."""
        out: dict[str, JSON] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "tiers"
        }
        out["tiers"] = [{**asdict(t), "kind": str(t.kind)} for t in self.tiers]
        return out


class Counters:
    """Mutable, thread-safe counters; gauges (``bytes_*``) are set, the rest only grow."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._seen: set[str] = set()

    def first_time(self, tag: str) -> bool:
        """True the first time `tag` is asked about (log-once decisions; thread-safe)."""
        with self._lock:
            if tag in self._seen:
                return False
            self._seen.add(tag)
            return True

    def incr(self, name: str, amount: int = 1) -> None:
        """Add `amount` to a counter (names are checked: a typo is a bug, not a new counter)."""
        if name not in self._values:
            raise KeyError(f"unknown cache counter {name!r}")
        with self._lock:
            self._values[name] += amount

    def set_gauge(self, name: str, value: int) -> None:
        """Set a ``bytes_*`` gauge."""
        if name not in _GAUGES:
            raise KeyError(f"{name!r} is not a gauge")
        with self._lock:
            self._values[name] = value

    def get(self, name: str) -> int:
        """Current value of one counter."""
        with self._lock:
            return self._values[name]

    def reset(self) -> None:
        """Zero every counter except the gauges, which describe what the tiers hold."""
        with self._lock:
            for name in self._values:
                if name not in _GAUGES:
                    self._values[name] = 0

    def snapshot(self, tiers: tuple[TierStats, ...] = ()) -> CounterSnapshot:
        """A frozen copy of every counter."""
        with self._lock:
            values = dict(self._values)
        return CounterSnapshot(**values, tiers=tiers)
