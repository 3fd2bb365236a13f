"""The meta actor: sole writer of the cache index.

Every mutation (reservations, announcements, claims, checkins, evictions) is
a message to this actor, which applies it to the `CacheIndex` under the
index lock and then carries out the resulting file I/O itself (deletions,
adoptions), so that a tier is back under its quota by the time the message
is answered. Lookups do not come here: they read the published index.

On start (and on every restart) it rebuilds the index from the stores: it
scans each file tier (temp files swept, every file validated, corrupt ones
deleted and counted) and re-registers the RAM tier's entries. A crash of
this actor therefore never forgets what the tiers hold.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pykka

from erllama_py.cache.actions import Action, Adopt, Demote, Drop, PersistHits, RemoveTemp
from erllama_py.cache.demotion import MappedRow
from erllama_py.cache.index import CacheIndex
from erllama_py.cache.key import key_hex
from erllama_py.cache.publish import SaveJob
from erllama_py.cache.ramstore import RamEntry
from erllama_py.cache.rows import Announcement, Claim, Reservation, ReserveRequest, Row, RowInfo
from erllama_py.cache.state import CacheState, tier_actor_name
from erllama_py.cache.writer_pool import submit_unreserved
from erllama_py.errors import CacheError, CacheFormatError, ReservationError
from erllama_py.kinds import TierKind
from erllama_py.timers import stop_timer
from supervisors import SupervisedActor

__all__ = ["MetaActor"]

log = logging.getLogger("erllama_py.cache")


class _Sweep:
    """Timer message: clean stale reservations and old temp files."""


class MetaActor(SupervisedActor):
    """Owns the index; see the module docstring."""

    def __init__(self, shared: CacheState) -> None:
        super().__init__()
        self.shared = shared
        self.index: CacheIndex | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle

    def on_start(self) -> None:
        settings = self.shared.settings
        index = CacheIndex(
            settings.tiers,
            demote_on_evict=settings.demote_on_evict,
            reservation_ttl_s=settings.reservation_ttl_s,
            writer_alive=self.shared.writer_alive,
        )
        counters = self.shared.counters
        actions: list[Action] = []
        with index.lock:
            for entry in self.shared.ram.entries():
                actions += index.insert_available(self._ram_row(index, entry))
            for store in self.shared.files.values():
                result = store.scan()
                counters.incr("corrupt_files", len(result.corrupt))
                counters.incr("temp_files_swept", result.temps_removed)
                for path, reason in result.corrupt:
                    log.warning("cache scan: deleted corrupt file %s (%s)", path, reason)
                actions += index.insert_scanned(result.rows)
        self.index = index
        self._run(actions, evictions=True)
        self._update_gauges()
        self.shared.publish_index(index)
        self._schedule_sweep()

    def on_stop(self) -> None:
        self._cancel_sweep()

    def on_failure(self, *_exc_info: object) -> None:
        self._cancel_sweep()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Sweep):
            self.sweep()
            self._schedule_sweep()
            return None
        return super().on_receive(message)

    def _schedule_sweep(self) -> None:
        interval = self.shared.settings.sweep_interval_s
        ref = self.actor_ref

        def tick() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(_Sweep())

        self._timer = threading.Timer(interval, tick)
        self._timer.daemon = True
        self._timer.start()

    def _cancel_sweep(self) -> None:
        stop_timer(self._timer)

    @property
    def _index(self) -> CacheIndex:
        assert self.index is not None
        return self.index

    # ------------------------------------------------------------------ publish protocol

    def reserve(self, request: ReserveRequest) -> int:
        """Reserve (key, tier); returns the reservation token (see `CacheIndex.reserve`)."""
        return self._reserve(request).token

    def _reserve(self, request: ReserveRequest) -> Reservation:
        index = self._index
        try:
            with index.lock:
                res, actions = index.reserve(request)
        except CacheError as exc:
            if not isinstance(exc, ReservationError):
                self.shared.counters.incr("quota_refusals")
            raise
        self._run(actions, evictions=True)
        self._update_gauges()
        return res

    def set_temp_path(self, key: bytes, tier: str, token: int, path: Path) -> None:
        with self._index.lock:
            self._index.set_temp_path(key, tier, token, path)

    def check_reservation(self, key: bytes, tier: str, token: int) -> None:
        with self._index.lock:
            self._index.check_reservation(key, tier, token)

    def mark_published(self, key: bytes, tier: str, token: int, path: Path) -> None:
        with self._index.lock:
            self._index.mark_published(key, tier, token, path)

    def announce(self, announcement: Announcement) -> RowInfo:
        """Publish a reserved row (see `CacheIndex.announce`)."""
        with self._index.lock:
            info, actions = self._index.announce(announcement)
        self._run(actions, evictions=True)
        self._update_gauges()
        return info

    def cancel(self, key: bytes, tier: str, token: int) -> None:
        """A writer gave up its reservation. If it failed (or was killed) after ``link(2)``
        but before it could tell, its file is published: adopt it, never orphan it."""
        with self._index.lock:
            cancelled = self._index.cancel(key, tier, token)
        store = self.shared.files.get(tier)
        if cancelled and store is not None:
            self._adopt(tier, key, store.final_path(key))
        self._update_gauges()

    def adopt_file(self, tier: str, key: bytes, path: Path) -> RowInfo | None:
        """Validate a published file and install it (after a writer lost its reservation)."""
        self._adopt(tier, key, path)
        return self._index.lookup_exact(key)

    def writer_down(self, writer: str) -> None:
        """A writer ended: clean its reservations by stage."""
        with self._index.lock:
            actions = self._index.writer_down(writer)
        self._run(actions)
        self._update_gauges()

    # ------------------------------------------------------------------ RAM tier

    def store_ram(self, entry: RamEntry, tier: str) -> RowInfo:
        """Install a RAM row in one step (reserve, keep the payload, announce).

        Raises:
            ReservationError: ``already_present``; PayloadTooLargeError / TierFullError.
        """
        request = ReserveRequest(
            entry.key, tier, entry.namespace, entry.tokens, entry.size, entry.reason, "ram"
        )
        res = self._reserve(request)
        self.shared.ram.put(entry)
        index = self._index
        with index.lock:
            info, more = index.announce(
                Announcement(
                    entry.key,
                    res.tier,
                    res.token,
                    entry.size,
                    checksum=entry.checksum,
                    created_ns=entry.created_ns,
                )
            )
        self._run(more, evictions=True)
        self._update_gauges()
        return info

    def promote(self, entry: RamEntry, tier: str) -> None:
        """Install a copy of a slower tier's hit in RAM, if there is room (best effort)."""
        index = self._index
        with index.lock:
            if index.row(entry.key, index.resolve_tier(tier)) is not None:
                return
        try:
            self.store_ram(entry, tier)
        except CacheError:
            return
        with index.lock:
            index.count_promotion(index.resolve_tier(tier))
        self.shared.counters.incr("promotions")

    # ------------------------------------------------------------------ readers

    def claim(self, key: bytes, tier: str | None = None) -> Claim | None:
        """Pin the fastest copy of `key` (or its copy in `tier`); None on a miss."""
        index = self._index
        with index.lock:
            claim = index.claim(key, tier)
            actions = index.persist_hits_action(claim) if claim else []
        self._run(actions)
        return claim

    def checkin(self, holder: int) -> None:
        with self._index.lock:
            self._index.checkin(holder)

    def wait_for_key(self, key: bytes, future: Future[RowInfo | None]) -> None:
        """Resolve `future` when `key` becomes available (or at once; None if nothing comes)."""
        with self._index.lock:
            self._index.add_waiter(key, future)

    def remove_corrupt(self, key: bytes, tier: str, reason: str) -> None:
        """A reader found a row corrupt: forget it, delete its data, count it."""
        with self._index.lock:
            actions = self._index.remove(key, tier)
        if actions:
            self.shared.counters.incr("corrupt_files")
            log.warning("cache: dropped corrupt row %s in %s (%s)", key_hex(key), tier, reason)
        self._run(actions)
        self._update_gauges()

    # ------------------------------------------------------------------ eviction

    def gc(self) -> int:
        """Evict every unpinned row; returns how many."""
        with self._index.lock:
            actions = self._index.gc()
        self._run(actions, evictions=True)
        self._update_gauges()
        return len(actions)

    def evict_bytes(self, target: int, tiers: list[str] | None = None) -> tuple[int, int]:
        """Evict LRU unpinned rows until `target` bytes are freed; returns (rows, bytes)."""
        with self._index.lock:
            actions = self._index.evict_bytes(target, tiers)
        self._run(actions, evictions=True)
        self._update_gauges()
        freed = sum(a.row.size for a in actions if isinstance(a, Drop | Demote))
        return len(actions), freed

    def sweep(self) -> int:
        """Clean stale reservations now (also run by a timer); returns how many."""
        with self._index.lock:
            actions = self._index.expire_stale()
        self._run(actions)
        for store in self.shared.files.values():
            removed = store.sweep_temps(older_than_s=self.shared.settings.reservation_ttl_s)
            self.shared.counters.incr("temp_files_swept", removed)
        self._update_gauges()
        return sum(isinstance(a, Adopt) for a in actions)

    def check(self) -> list[str]:
        """The index's invariants, then index versus disk in both directions."""
        index = self._index
        with index.lock:
            problems = index.check()
            everything = index.rows()
        rows = [r for r in everything if r.status == "available"]
        known: dict[str, set[str]] = {name: set() for name in self.shared.files}
        for info in everything:
            if info.status == "writing" and info.tier in self.shared.files:
                # A save in flight may have linked its file and not yet announced it.
                known[info.tier].add(self.shared.files[info.tier].final_path(info.key).name)
        for info in rows:
            if info.kind == "ram":
                entry = self.shared.ram.get(info.key)
                if entry is None or entry.size != info.size:
                    problems.append(f"ram row {info.key_hex} has no matching RAM entry")
                continue
            if info.path is None:
                problems.append(f"{info.tier} row {info.key_hex} has no path")
                continue
            known[info.tier].add(info.path.name)
            try:
                size = info.path.stat().st_size
            except FileNotFoundError:
                problems.append(f"{info.tier} row {info.key_hex} names a missing file")
                continue
            if size != info.size:
                problems.append(f"{info.tier} row {info.key_hex}: file is {size}, not {info.size}")
        for name, store in self.shared.files.items():
            for path in store.root.glob("*.kvc"):
                if path.name not in known[name]:
                    problems.append(f"{name}: file {path.name} is not in the index")
        return problems

    # ------------------------------------------------------------------ actions

    def _run(self, actions: list[Action], *, evictions: bool = False) -> None:
        counters = self.shared.counters
        for action in actions:
            if isinstance(action, Drop):
                if evictions:
                    counters.incr("evictions")
                self._drop(action.row)
            elif isinstance(action, Demote):
                counters.incr("evictions")
                self._demote(action)
            elif isinstance(action, Adopt):
                res = action.reservation
                store = self.shared.files.get(res.tier)
                if store is not None:
                    self._adopt(res.tier, res.key, res.path or store.final_path(res.key))
            elif isinstance(action, RemoveTemp):
                action.path.unlink(missing_ok=True)
            elif isinstance(action, PersistHits):
                self._persist_hits(action)

    def _drop(self, row: Row) -> None:
        if row.kind == "ram":
            self.shared.ram.delete(row.key)
        elif row.path is not None:
            self.shared.files[row.tier].delete(row.path)

    def count_demotion_in(self, tier: str) -> None:
        """A writer saved a demoted row in `tier` (per-tier ``demotions_in``)."""
        with self._index.lock:
            self._index.count_demotion_in(tier)

    def _demote(self, action: Demote) -> None:
        if action.row.kind != "ram":
            self._demote_file(action)
            return
        entry = self.shared.ram.pop(action.row.key)
        if entry is None:
            return
        job = SaveJob(
            namespace=entry.namespace,
            tokens=entry.tokens,
            payload=entry.payload,
            reason=entry.reason,
            tier=action.targets[0],
            fallback_tiers=action.targets[1:],
            owns_payload=True,
            demotion=True,
            checksum=entry.checksum,
        )
        submit_unreserved(self.shared, job)

    def _demote_file(self, action: Demote) -> None:
        """Map the evicted file row's payload, delete its file, queue its save further on."""
        row = action.row
        store = self.shared.files[row.tier]
        assert row.path is not None
        try:
            payload = MappedRow.open(row.path, row.key)
        except CacheFormatError as exc:
            self.shared.counters.incr("corrupt_files")
            log.warning("cache: evicted row %s is corrupt (%s); dropped", row.path, exc.reason)
            store.delete(row.path)
            return
        except OSError as exc:
            log.info("cache: evicted row %s cannot be read (%s); dropped", row.path, exc)
            store.delete(row.path)
            return
        store.delete(row.path)  # the mapping keeps the bytes until the writer is done
        job = SaveJob(
            namespace=row.namespace,
            tokens=row.tokens,
            payload=payload,
            reason=row.reason,
            tier=action.targets[0],
            fallback_tiers=action.targets[1:],
            owns_payload=True,
            demotion=True,
            checksum=payload.header.payload_checksum,
        )
        submit_unreserved(self.shared, job)

    def _adopt(self, tier: str, key: bytes, path: Path) -> None:
        index = self._index
        store = self.shared.files[tier]
        if not path.exists():
            return
        with index.lock:
            if index.row(key, tier) is not None:
                return
        try:
            row = store.validate(path, key)
        except CacheFormatError as exc:
            self.shared.counters.incr("corrupt_files")
            log.warning("cache: adoption of %s failed (%s); deleted", path, exc.reason)
            store.delete(path)
            return
        except OSError:
            return
        with index.lock:
            actions = index.insert_available(row)
        self.shared.counters.incr("adoptions")
        self._run(actions, evictions=True)

    def _persist_hits(self, action: PersistHits) -> None:
        for store in self.shared.files.values():
            if action.path.parent != store.root:
                continue
            ref = self.shared.registry.whereis(tier_actor_name(store.kind, store.root))
            if isinstance(ref, pykka.ActorRef):
                ref.tell(action)
            else:
                store.persist_hits(action.path, action.hits)
            return

    def _ram_row(self, index: CacheIndex, entry: RamEntry) -> Row:
        tier = index.resolve_tier("ram")
        return Row(
            key=entry.key,
            tier=tier,
            kind=TierKind.RAM,
            namespace=entry.namespace,
            tokens=entry.tokens,
            size=entry.size,
            reason=entry.reason,
            created_ns=entry.created_ns,
            checksum=entry.checksum,
        )

    def _update_gauges(self) -> None:
        index = self._index
        totals = {"ram": 0, "ram_file": 0, "disk": 0}
        with index.lock:
            for tier in index.tier_names:
                kind = index.tier_settings(tier).kind
                totals[kind] += index.used_bytes(tier) - index.reserved_bytes(tier)
        counters = self.shared.counters
        counters.set_gauge("bytes_ram", totals["ram"])
        counters.set_gauge("bytes_ramfile", totals["ram_file"])
        counters.set_gauge("bytes_disk", totals["disk"])
