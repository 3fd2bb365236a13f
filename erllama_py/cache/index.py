"""The cache index: rows, per-tier LRU and quotas, pins, reservations and waiters.

This is the meta actor's state, kept free of threads and file I/O so that it
can be tested as a state machine. The meta actor is its only writer and runs
every mutation under `CacheIndex.lock`; readers on the hot path (exact and
longest-prefix lookups, `rows()`) take the same lock for microseconds and never
wait in the actor's mailbox.

Mutations that require I/O return *actions* (`Drop`, `Demote`, `Adopt`,
`PersistHits`, `RemoveTemp`) for the meta actor to carry out after the
change is committed here, as diskcache removes obsolete files only after its
transaction commits.

A row is identified by (key, tier): the same key may have a copy in RAM and
one on disk (promotion, demotion). A key enters its namespace's token trie
when its first copy becomes available and leaves it with its last copy.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from erllama_py.cache.actions import Action, Adopt, Demote, Drop, PersistHits, RemoveTemp
from erllama_py.cache.key import Namespace, key_hex
from erllama_py.cache.rows import (
    Announcement,
    Claim,
    PrefixHit,
    Reservation,
    ReserveRequest,
    Row,
    RowInfo,
)
from erllama_py.cache.trie import TokenTrie
from erllama_py.config import TierSettings
from erllama_py.errors import (
    PayloadTooLargeError,
    ReservationError,
    TierFullError,
    UnknownTierError,
)

__all__ = ["CacheIndex"]

HIT_BIAS_S = 1.0  # seconds of recency credited per persisted hit when rows are installed at scan

# Holder ids and reservation tokens come from one counter for the whole process, not one per
# index: a claim or a reservation granted by a previous incarnation of the meta actor (whose
# index died with it) must never match one granted by the restarted actor's new index.
_IDS = itertools.count(1)


@dataclass
class _Waiters:
    futures: list[Future[RowInfo | None]] = field(default_factory=list)


class CacheIndex:
    """All of the meta actor's state. Mutate only from the meta actor, under `lock`."""

    def __init__(
        self,
        tiers: Sequence[TierSettings],
        *,
        demote_on_evict: bool = True,
        reservation_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        writer_alive: Callable[[str], bool] = lambda _writer: True,
    ) -> None:
        if not tiers:
            raise ValueError("a cache needs at least one tier")
        self.lock = threading.RLock()
        self._tiers: dict[str, TierSettings] = {t.name: t for t in tiers}
        self._order: tuple[str, ...] = tuple(t.name for t in tiers)
        self._demote = demote_on_evict
        self._ttl = reservation_ttl_s
        self._clock = clock
        self._writer_alive = writer_alive
        self._rows: dict[bytes, dict[str, Row]] = {}
        # Invariant: each tier's LRU holds exactly its available rows, least recently used first.
        self._lru: dict[str, OrderedDict[bytes, None]] = {t: OrderedDict() for t in self._order}
        # Invariant: used[tier] = sizes of its rows + sizes of its reservations <= its quota.
        self._used: dict[str, int] = dict.fromkeys(self._order, 0)
        self._reservations: dict[tuple[bytes, str], Reservation] = {}
        # Invariant: a namespace's trie holds exactly the keys with at least one available copy.
        self._tries: dict[bytes, TokenTrie] = {}
        self._holders: dict[int, tuple[bytes, str]] = {}
        self._waiters: dict[bytes, _Waiters] = {}
        self._ids = _IDS
        self._tier_hits: dict[str, int] = dict.fromkeys(self._order, 0)
        self._tier_evictions: dict[str, int] = dict.fromkeys(self._order, 0)
        self._tier_promotions: dict[str, int] = dict.fromkeys(self._order, 0)
        self._tier_demotions: dict[str, int] = dict.fromkeys(self._order, 0)
        self._tier_demotions_in: dict[str, int] = dict.fromkeys(self._order, 0)

    # ------------------------------------------------------------------ tiers

    @property
    def tier_names(self) -> tuple[str, ...]:
        """Tier names, fastest first."""
        return self._order

    def tier_settings(self, name: str) -> TierSettings:
        """Settings of a tier by exact name."""
        return self._tiers[name]

    def resolve_tier(self, name: str) -> str:
        """Exact tier name for ``ram``, ``disk``, ``disk:<root>``...

        Raises:
            UnknownTierError: no such tier.
        """
        if name in self._tiers:
            return name
        for tier in self._order:
            if self._tiers[tier].kind == name:
                return tier
        raise UnknownTierError(name, self._order)

    def slower_tiers(self, tier: str) -> tuple[str, ...]:
        """Tiers after `tier` in the configured order."""
        return self._order[self._order.index(tier) + 1 :]

    def used_bytes(self, tier: str) -> int:
        """Bytes charged to a tier: available rows plus reservations."""
        return self._used[tier]

    # ------------------------------------------------------------------ reads (any thread)

    def lookup_exact(self, key: bytes) -> RowInfo | None:
        """The fastest available copy of `key`, or None."""
        with self.lock:
            row = self._fastest(key)
            return self._info(row) if row else None

    def pending(self, key: bytes) -> bool:
        """True while a save of `key` is in flight in any tier."""
        with self.lock:
            return any(k == key for k, _ in self._reservations)

    def longest_prefix(self, namespace: Namespace, prompt: bytes) -> PrefixHit | None:
        """Rows sharing the longest prefix with `prompt` (u32 LE tokens) in `namespace`."""
        with self.lock:
            trie = self._tries.get(namespace.prefix)
            if trie is None:
                return None
            match = trie.longest_prefix(prompt)
            if match is None:
                return None
            covered = common = None
            common_len = 0
            if match.covered is not None:
                row = self._fastest(match.covered.key)
                covered = self._info(row) if row else None
            if match.common is not None:
                row = self._fastest(match.common.key)
                common = self._info(row) if row else None
                common_len = match.common_len
            if covered is None and common is None:
                return None
            return PrefixHit(covered=covered, common=common, common_len=common_len)

    def prefix_candidates(
        self, namespace: Namespace, prompt: bytes, limit: int, min_tokens: int = 1
    ) -> list[tuple[RowInfo, int]]:
        """Up to `limit` rows sharing at least `min_tokens` tokens with `prompt`, best
        first (most shared tokens, then shortest), each with the shared length."""
        with self.lock:
            trie = self._tries.get(namespace.prefix)
            if trie is None:
                return []
            out: list[tuple[RowInfo, int]] = []
            for candidate in trie.candidates(prompt, limit, max(1, min_tokens)):
                row = self._fastest(candidate.key)
                if row is not None:
                    out.append((self._info(row), candidate.usable))
            return out

    def rows(self) -> list[RowInfo]:
        """Every row and every save in flight."""
        with self.lock:
            out = [self._info(row) for copies in self._rows.values() for row in copies.values()]
            out.extend(
                RowInfo(
                    key=res.key,
                    tier=res.tier,
                    kind=self._tiers[res.tier].kind,
                    n_tokens=len(res.tokens) // 4,
                    size=res.size,
                    hits=0,
                    refcount=0,
                    status="writing",
                    reason=res.reason,
                    created_ns=0,
                    path=res.path,
                )
                for res in self._reservations.values()
            )
            return out

    def row(self, key: bytes, tier: str) -> Row | None:
        """The row object itself (meta actor and tests only)."""
        return self._rows.get(key, {}).get(tier)

    def tier_rows(self, tier: str) -> int:
        """Number of available rows in a tier."""
        return len(self._lru[tier])

    def tier_counts(self, tier: str) -> tuple[int, int, int, int]:
        """(hits, evictions, promotions in, demotions out) seen by a tier since start."""
        return (
            self._tier_hits[tier],
            self._tier_evictions[tier],
            self._tier_promotions[tier],
            self._tier_demotions[tier],
        )

    def demotions_in(self, tier: str) -> int:
        """Rows demoted into `tier` from a faster one since start."""
        return self._tier_demotions_in[tier]

    def count_demotion_in(self, tier: str) -> None:
        """A row evicted from a faster tier was saved in `tier`."""
        self._tier_demotions_in[tier] += 1

    def count_promotion(self, tier: str) -> None:
        """A row was promoted into `tier`."""
        self._tier_promotions[tier] += 1

    def reserved_bytes(self, tier: str) -> int:
        """Bytes of a tier held by saves in flight."""
        return sum(r.size for r in self._reservations.values() if r.tier == tier)

    def reservations(self) -> list[Reservation]:
        """Saves in flight."""
        return list(self._reservations.values())

    # ------------------------------------------------------------------ the publish protocol

    def reserve(self, request: ReserveRequest) -> tuple[Reservation, list[Action]]:
        """Reserve the right to publish (key, tier) and `size` bytes of the tier's quota.

        Evicts the tier's least recently used unpinned rows if needed (returned
        as actions), but only when that frees enough: never a partial eviction.

        Raises:
            UnknownTierError, PayloadTooLargeError, TierFullError,
            ReservationError: ``already_present`` or ``conflict``.
        """
        key, size = request.key, request.size
        tier = self.resolve_tier(request.tier)
        quota = self._tiers[tier].quota_bytes
        if size > quota:
            raise PayloadTooLargeError(tier, size, quota)
        if tier in self._rows.get(key, {}):
            raise ReservationError("already_present", key_hex(key))
        actions: list[Action] = []
        old = self._reservations.get((key, tier))
        if old is not None:
            if self._is_live(old):
                raise ReservationError("conflict", key_hex(key))
            actions.extend(self._expire(old))
        actions.extend(self._make_room(tier, size))
        reservation = Reservation(
            key=key,
            tier=tier,
            token=next(self._ids),
            writer=request.writer,
            size=size,
            namespace=request.namespace,
            tokens=request.tokens,
            reason=request.reason,
            expires=self._clock() + self._ttl,
        )
        self._reservations[(key, tier)] = reservation
        self._used[tier] += size
        return reservation, actions

    def set_temp_path(self, key: bytes, tier: str, token: int, path: Path) -> None:
        """Record where the writer is writing, so a dead writer's temp file can be removed."""
        self._live(key, tier, token).temp_path = path

    def check_reservation(self, key: bytes, tier: str, token: int) -> None:
        """Confirm the reservation just before linking, extending its TTL.

        Raises:
            ReservationError: ``expired`` (the writer must abandon without publishing).
        """
        self._live(key, tier, token).expires = self._clock() + self._ttl

    def mark_published(self, key: bytes, tier: str, token: int, path: Path) -> None:
        """The file is linked under its final name: from now on it is adopted, not dropped."""
        res = self._live(key, tier, token)
        res.stage = "post_link"
        res.path = path
        res.temp_path = None
        res.expires = self._clock() + self._ttl

    def announce(self, announcement: Announcement) -> tuple[RowInfo, list[Action]]:
        """Make the reserved row available and wake the waiters for its key.

        `size` may differ from the reservation (an adopted existing file);
        the difference is charged, evicting if the tier would go over quota.

        Raises:
            ReservationError: ``expired``.
        """
        key, tier, size = announcement.key, announcement.tier, announcement.size
        created_ns = announcement.created_ns
        res = self._live(key, tier, announcement.token)
        del self._reservations[(key, tier)]
        self._used[tier] -= res.size
        row = Row(
            key=key,
            tier=tier,
            kind=self._tiers[tier].kind,
            namespace=res.namespace,
            tokens=res.tokens,
            size=size,
            reason=res.reason,
            created_ns=created_ns if created_ns is not None else time.time_ns(),
            path=announcement.path if announcement.path is not None else res.path,
            checksum=announcement.checksum,
            last_used=self._clock(),
        )
        actions = self._install(row)
        return self._info(row), actions

    def cancel(self, key: bytes, tier: str, token: int) -> bool:
        """Give up a reservation (wrong or stale token: no-op, False). Waiters get a miss.

        Returns True if the reservation was this token's and is gone.
        """
        res = self._reservations.get((key, tier))
        if res is None or res.token != token:
            return False
        del self._reservations[(key, tier)]
        self._used[tier] -= res.size
        self._wake_if_done(key)
        return True

    def expire_stale(self) -> list[Action]:
        """Clean every reservation whose writer died or whose TTL passed (the sweep)."""
        actions: list[Action] = []
        for res in list(self._reservations.values()):
            if not self._is_live(res):
                actions.extend(self._expire(res))
        return actions

    def writer_down(self, writer: str) -> list[Action]:
        """A writer died: clean its reservations by stage."""
        actions: list[Action] = []
        for res in list(self._reservations.values()):
            if res.writer == writer:
                actions.extend(self._expire(res))
        return actions

    # ------------------------------------------------------------------ rows from elsewhere

    def insert_available(self, row: Row, *, bias_hits: bool = False) -> list[Action]:
        """Install a row found by a scan, an adoption or a RAM store (replaces nothing).

        With `bias_hits`, the row's persisted hit count makes it look younger
        (+1 s per hit), so popular rows survive the first eviction after a
        restart (spec 4.9).
        """
        tier = row.tier
        if tier not in self._tiers:
            raise UnknownTierError(tier, self._order)
        if tier in self._rows.get(row.key, {}):
            return []
        row.last_used = self._clock() + (row.hits * HIT_BIAS_S if bias_hits else 0.0)
        return self._install(row)

    def insert_scanned(self, rows: Iterable[Row]) -> list[Action]:
        """Install the rows of a scan, least popular first, so that the LRU order of each
        tier puts rows with more persisted hits after (younger than) the others."""
        actions: list[Action] = []
        for row in sorted(rows, key=lambda r: r.hits):
            actions.extend(self.insert_available(row, bias_hits=True))
        return actions

    def remove(self, key: bytes, tier: str) -> list[Action]:
        """Remove a row whatever its pins (a reader found it corrupt); its data is dropped."""
        row = self._rows.get(key, {}).get(tier)
        if row is None:
            return []
        self._uninstall(row)
        return [Drop(row)]

    # ------------------------------------------------------------------ readers: claim / checkin

    def claim(self, key: bytes, tier: str | None = None) -> Claim | None:
        """Pin the fastest available copy of `key` (or the copy in `tier`).

        Bumps its hits and recency. Returns None on a miss.
        """
        copies = self._rows.get(key)
        if not copies:
            return None
        row = copies.get(self.resolve_tier(tier)) if tier is not None else self._fastest(key)
        if row is None:
            return None
        row.refcount += 1
        row.hits += 1
        row.last_used = self._clock()
        self._lru[row.tier].move_to_end(key)
        self._tier_hits[row.tier] += 1
        holder = next(self._ids)
        self._holders[holder] = (key, row.tier)
        return Claim(
            holder=holder,
            key=key,
            tier=row.tier,
            kind=row.kind,
            namespace=row.namespace,
            tokens=row.tokens,
            size=row.size,
            reason=row.reason,
            path=row.path,
            checksum=row.checksum,
        )

    def checkin(self, holder: int) -> None:
        """Release a pin (unknown holder: no-op; refcount saturates at 0)."""
        where = self._holders.pop(holder, None)
        if where is None:
            return
        row = self._rows.get(where[0], {}).get(where[1])
        if row is not None:
            row.refcount = max(0, row.refcount - 1)

    def persist_hits_action(self, claim: Claim) -> list[Action]:
        """The action persisting a file row's hit count after a claim."""
        row = self._rows.get(claim.key, {}).get(claim.tier)
        if row is None or row.path is None:
            return []
        return [PersistHits(row.path, row.hits)]

    # ------------------------------------------------------------------ waiters

    def add_waiter(self, key: bytes, future: Future[RowInfo | None]) -> None:
        """Resolve `future` with the row once `key` is available, or None if no save is coming.

        Resolves at once when the row is already available or nothing is in flight.
        """
        row = self._fastest(key)
        if row is not None:
            future.set_result(self._info(row))
            return
        if not any(k == key for k, _ in self._reservations):
            future.set_result(None)
            return
        self._waiters.setdefault(key, _Waiters()).futures.append(future)

    # ------------------------------------------------------------------ eviction

    def gc(self) -> list[Action]:
        """Evict every unpinned row of every tier (no demotion: a full flush)."""
        actions: list[Action] = []
        for tier in self._order:
            for key in list(self._lru[tier]):
                row = self._rows[key][tier]
                if row.refcount == 0:
                    self._uninstall(row)
                    self._tier_evictions[tier] += 1
                    actions.append(Drop(row))
        return actions

    def evict_bytes(self, target: int, tiers: Iterable[str] | None = None) -> list[Action]:
        """Evict least recently used unpinned rows, oldest first across `tiers`, until
        at least `target` bytes are freed. Rows are demoted to the slower tiers when
        demotion is on."""
        if target <= 0:
            return []
        names = self._order if tiers is None else tuple(self.resolve_tier(t) for t in tiers)
        candidates = sorted(
            (self._rows[key][tier].last_used, self._order.index(tier), key)
            for tier in names
            for key in self._lru[tier]
        )
        freed = 0
        actions: list[Action] = []
        for _, tier_pos, key in candidates:
            if freed >= target:
                break
            row = self._rows[key][self._order[tier_pos]]
            if row.refcount > 0:
                continue
            freed += row.size
            actions.append(self._evict(row))
        return actions

    # ------------------------------------------------------------------ self-check

    def check(self) -> list[str]:
        """Cross-examine the invariants; returns one line per violation (empty = sound)."""
        problems: list[str] = []
        for tier in self._order:
            rows = [c[tier] for c in self._rows.values() if tier in c]
            row_bytes = sum(r.size for r in rows)
            reserved = self.reserved_bytes(tier)
            if self._used[tier] != row_bytes + reserved:
                problems.append(
                    f"{tier}: used {self._used[tier]} != rows {row_bytes} + reserved {reserved}"
                )
            quota = self._tiers[tier].quota_bytes
            if self._used[tier] > quota:
                problems.append(f"{tier}: used {self._used[tier]} exceeds quota {quota}")
            if set(self._lru[tier]) != {r.key for r in rows}:
                problems.append(f"{tier}: LRU does not match its rows")
            problems.extend(
                f"{tier}: negative refcount on {r.key.hex()}" for r in rows if r.refcount < 0
            )
        live_keys: dict[bytes, set[bytes]] = {}
        for key, copies in self._rows.items():
            if not copies:
                problems.append(f"{key.hex()}: empty copy set left in the index")
                continue
            first = next(iter(copies.values()))
            live_keys.setdefault(first.namespace.prefix, set()).add(key)
            for row in copies.values():
                if row.key != key:
                    problems.append(f"{key.hex()}: row filed under the wrong key")
        for prefix, trie in self._tries.items():
            if {ref.key for ref in trie.rows()} != live_keys.get(prefix, set()):
                problems.append(f"trie of namespace {prefix[:4].hex()} does not match the rows")
        for prefix, keys in live_keys.items():
            if keys and prefix not in self._tries:
                problems.append(f"namespace {prefix[:4].hex()} has rows but no trie")
        for holder, (key, tier) in self._holders.items():
            pinned = self._rows.get(key, {}).get(tier)
            if pinned is not None and pinned.refcount <= 0:
                problems.append(f"holder {holder} pins {key.hex()} whose refcount is 0")
        return problems

    # ------------------------------------------------------------------ internals

    def _fastest(self, key: bytes) -> Row | None:
        copies = self._rows.get(key)
        if not copies:
            return None
        for tier in self._order:
            row = copies.get(tier)
            if row is not None:
                return row
        return None

    def _info(self, row: Row) -> RowInfo:
        return RowInfo(
            key=row.key,
            tier=row.tier,
            kind=row.kind,
            n_tokens=row.n_tokens,
            size=row.size,
            hits=row.hits,
            refcount=row.refcount,
            status="available",
            reason=row.reason,
            created_ns=row.created_ns,
            path=row.path,
        )

    def _live(self, key: bytes, tier: str, token: int) -> Reservation:
        res = self._reservations.get((key, tier))
        if res is None or res.token != token:
            raise ReservationError("expired", key_hex(key))
        return res

    def _is_live(self, res: Reservation) -> bool:
        return res.expires > self._clock() and self._writer_alive(res.writer)

    def _expire(self, res: Reservation) -> list[Action]:
        del self._reservations[(res.key, res.tier)]
        self._used[res.tier] -= res.size
        self._wake_if_done(res.key)
        # Even a pre_link writer may have died between link(2) and mark_published:
        # Adopt looks for the final file and validates it before installing anything.
        actions: list[Action] = []
        if res.temp_path is not None:
            actions.append(RemoveTemp(res.temp_path))
        actions.append(Adopt(res))
        return actions

    def _install(self, row: Row) -> list[Action]:
        copies = self._rows.setdefault(row.key, {})
        first_copy = not copies
        copies[row.tier] = row
        self._lru[row.tier][row.key] = None
        self._used[row.tier] += row.size
        if first_copy:
            trie = self._tries.get(row.namespace.prefix)
            if trie is None:
                trie = self._tries[row.namespace.prefix] = TokenTrie()
            trie.insert(row.tokens, row.key)
        actions = self._enforce_quota(row.tier, protect=row.key)
        self._wake(row.key)
        return actions

    def _uninstall(self, row: Row) -> None:
        copies = self._rows.get(row.key, {})
        if copies.get(row.tier) is not row:
            return
        del copies[row.tier]
        self._lru[row.tier].pop(row.key, None)
        self._used[row.tier] -= row.size
        if not copies:
            del self._rows[row.key]
            trie = self._tries.get(row.namespace.prefix)
            if trie is not None:
                trie.remove(row.tokens, row.key)
                if len(trie) == 0:
                    del self._tries[row.namespace.prefix]
        self._holders = {h: w for h, w in self._holders.items() if w != (row.key, row.tier)}

    def _evict(self, row: Row) -> Action:
        self._uninstall(row)
        self._tier_evictions[row.tier] += 1
        # Any tier's row moves on to the slower tiers (RAM -> ram_file -> disk); a file row
        # needs its file, which the meta actor maps before deleting it.
        if self._demote and (row.kind == "ram" or row.path is not None):
            targets = self.slower_tiers(row.tier)
            if targets:
                self._tier_demotions[row.tier] += 1
                return Demote(row, targets)
        return Drop(row)

    def _candidates(self, tier: str, needed: int, protect: bytes | None) -> list[Row] | None:
        """Least recently used unpinned rows freeing at least `needed` bytes, or None."""
        picked: list[Row] = []
        freed = 0
        for key in self._lru[tier]:
            if freed >= needed:
                break
            row = self._rows[key][tier]
            if row.refcount > 0 or key == protect:
                continue
            picked.append(row)
            freed += row.size
        return picked if freed >= needed else None

    def _make_room(self, tier: str, size: int) -> list[Action]:
        quota = self._tiers[tier].quota_bytes
        needed = self._used[tier] + size - quota
        if needed <= 0:
            return []
        victims = self._candidates(tier, needed, None)
        if victims is None:
            evictable = sum(
                self._rows[k][tier].size
                for k in self._lru[tier]
                if self._rows[k][tier].refcount == 0
            )
            raise TierFullError(tier, size, quota - self._used[tier] + evictable)
        return [self._evict(row) for row in victims]

    def _enforce_quota(self, tier: str, protect: bytes) -> list[Action]:
        """After an install that grew a tier (scan, size correction): evict back under quota.

        If only pinned rows remain, the newly installed row itself goes.
        """
        quota = self._tiers[tier].quota_bytes
        needed = self._used[tier] - quota
        if needed <= 0:
            return []
        victims = self._candidates(tier, needed, protect)
        if victims is None:
            row = self._rows[protect][tier]
            return [self._evict(row)]
        return [self._evict(row) for row in victims]

    def _wake(self, key: bytes) -> None:
        waiters = self._waiters.pop(key, None)
        if waiters is None:
            return
        row = self._fastest(key)
        info = self._info(row) if row else None
        for future in waiters.futures:
            if not future.done():
                future.set_result(info)

    def _wake_if_done(self, key: bytes) -> None:
        """Answer waiters with a miss when the last save in flight for `key` is gone."""
        if any(k == key for k, _ in self._reservations):
            return
        self._wake(key)
