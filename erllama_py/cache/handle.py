"""`CacheHandle`: the cache's facade for the model layer, the REPL and tests.

Each method says whether it reads without the meta actor (lookups, loads,
counters: they never queue behind its mailbox) or goes through it (every
mutation: saves' reservations, claims, checkins, evictions).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pykka

from erllama_py.cache import kvc
from erllama_py.cache.counters import CounterSnapshot, TierStats
from erllama_py.cache.index import CacheIndex
from erllama_py.cache.key import Namespace, TokenInput, encode_tokens, make_key_encoded, prefix_keys
from erllama_py.cache.meta_client import MetaClient
from erllama_py.cache.payload import Payload, has_checksum, payload_checksum, payload_view
from erllama_py.cache.publish import SaveJob, SaveResult, run_save
from erllama_py.cache.ramstore import RamEntry
from erllama_py.cache.rows import Claim, PrefixHit, RowInfo
from erllama_py.cache.state import CacheState
from erllama_py.cache.writer_pool import submit_reserved
from erllama_py.errors import CHECKSUM_MISMATCH, CacheError, CacheFormatError, RuntimeStoppedError
from erllama_py.kinds import SaveReason, TierKind

__all__ = ["CacheHandle", "SaveTicket"]

Allocator = kvc.Allocator


@dataclass(frozen=True)
class SaveTicket:
    """A queued save: its key is known now; `future` resolves when it is published."""

    key: bytes
    tier: str
    future: Future[SaveResult]

    def result(self, timeout: float | None = None) -> SaveResult:
        """Wait for the save (raises its error if it failed)."""
        return self.future.result(timeout)


class CacheHandle:
    """A running cache. Create it with `erllama_py.cache.start` (or the runtime does)."""

    def __init__(self, shared: CacheState, sup: pykka.ActorRef[Any] | None = None) -> None:
        self.shared = shared
        self._sup = sup
        self._meta = MetaClient(shared)

    # ------------------------------------------------------------------ saves

    def save_async(
        self,
        namespace: Namespace,
        tokens: TokenInput | bytes,
        payload: Payload,
        *,
        tier: str | None = None,
        reason: SaveReason | str = SaveReason.FINISH,
        owns_payload: bool = False,
        extra: Mapping[str, object] | None = None,
    ) -> SaveTicket:
        """Queue a save; returns at once with the key (goes through the meta actor).

        For a file tier the row is framed and reserved in this thread, then
        written by the pool; for RAM it is installed here and now (by
        reference when `owns_payload`, else as an immutable copy). `payload`
        is any buffer, or an object with ``view()`` (shared memory).

        Raises:
            InvalidTokensError, UnknownTierError, PayloadTooLargeError,
            TierFullError, RuntimeStoppedError.
        """
        token_bytes = tokens if isinstance(tokens, bytes) else encode_tokens(tokens)
        index = self.shared.index()
        tier_name = self._tier_that_holds(
            index, index.resolve_tier(tier or index.tier_names[0]), payload
        )
        job = SaveJob(
            namespace=namespace,
            tokens=token_bytes,
            payload=payload,
            reason=kvc.save_reason(reason),
            tier=tier_name,
            # A tier whose rows are all pinned (claimed by readers) has no room now: the
            # row goes to the next slower tier with room rather than being dropped.
            fallback_tiers=self._tiers_that_hold(index, index.slower_tiers(tier_name), payload),
            owns_payload=owns_payload,
            extra=extra,
        )
        if index.tier_settings(tier_name).kind is TierKind.RAM:
            # Refuse what a file tier would refuse (a reserved extra key), so that every
            # RAM row can later be demoted to a file tier.
            kvc.build_prefix_encoded(namespace, b"", b"", job.reason, extra=extra)
            key = self._save_ram(job)
            tier_name = job.future.result().tier
        else:
            key = submit_reserved(self.shared, job)
            tier_name = job.tier
        return SaveTicket(key=key, tier=tier_name, future=job.future)

    @staticmethod
    def _tiers_that_hold(
        index: CacheIndex, tiers: tuple[str, ...], payload: Payload
    ) -> tuple[str, ...]:
        size = payload_view(payload).nbytes
        return tuple(t for t in tiers if size <= index.tier_settings(t).quota_bytes)

    def _tier_that_holds(self, index: CacheIndex, tier: str, payload: Payload) -> str:
        """`tier`, or the first slower tier whose quota can hold the payload when `tier`'s
        whole quota cannot (counted in ``saves_redirected``); `tier` if none can."""
        size = payload_view(payload).nbytes
        for candidate in (tier, *index.slower_tiers(tier)):
            if size <= index.tier_settings(candidate).quota_bytes:
                if candidate != tier:
                    self.shared.counters.incr("saves_redirected")
                return candidate
        return tier

    def save(
        self,
        namespace: Namespace,
        tokens: TokenInput | bytes,
        payload: Payload,
        *,
        tier: str | None = None,
        reason: SaveReason | str = SaveReason.FINISH,
        owns_payload: bool = False,
        extra: Mapping[str, object] | None = None,
        timeout: float | None = 60.0,
    ) -> bytes:
        """Save and wait until the row is published; returns its key.

        A row already present is not an error (the key is returned).

        Raises:
            as `save_async`, plus the writer's error (CacheError, OSError wrapped).
        """
        ticket = self.save_async(
            namespace,
            tokens,
            payload,
            tier=tier,
            reason=reason,
            owns_payload=owns_payload,
            extra=extra,
        )
        ticket.result(timeout)
        return ticket.key

    def _save_ram(self, job: SaveJob) -> bytes:
        try:
            result = run_save(
                job,
                meta=self._meta.ask,
                stores=self.shared.files,
                counters=self.shared.counters,
                writer="caller",
            )
        except Exception as exc:
            job.future.set_exception(exc)
            raise
        job.future.set_result(result)
        return result.key

    # ------------------------------------------------------------------ lookups (no mailbox)

    def key(self, namespace: Namespace, tokens: TokenInput | bytes) -> bytes:
        """The cache key of `tokens` in `namespace` (pure)."""
        token_bytes = tokens if isinstance(tokens, bytes) else encode_tokens(tokens)
        return make_key_encoded(namespace, token_bytes)

    def lookup_exact(self, namespace: Namespace, tokens: TokenInput | bytes) -> RowInfo | None:
        """The row holding exactly `tokens`, if any (reads the index; no mailbox)."""
        return self.shared.index().lookup_exact(self.key(namespace, tokens))

    def lookup_key(self, key: bytes) -> RowInfo | None:
        """The row with this key, if available (no mailbox)."""
        return self.shared.index().lookup_exact(key)

    def pending(self, key: bytes) -> bool:
        """Whether a save of this key is in flight (reads the index; no mailbox)."""
        return self.shared.index().pending(key)

    def lookup_exact_or_wait(self, key: bytes, timeout_s: float) -> RowInfo | None:
        """The row with this key, waiting up to `timeout_s` for a save of it in flight.

        Goes through the meta actor once (to register the wait); returns None
        at once when no save of that key is in flight.
        """
        index = self.shared.index()
        info = index.lookup_exact(key)
        if info is not None or timeout_s <= 0:
            return info
        future: Future[RowInfo | None] = Future()
        self._meta.ask.wait_for_key(key, future)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            return index.lookup_exact(key)

    def longest_prefix(self, namespace: Namespace, tokens: TokenInput | bytes) -> PrefixHit | None:
        """Rows sharing the longest prefix with `tokens`, via the token trie (no mailbox).

        Time is linear in the prompt, whatever its length and however many rows.
        """
        token_bytes = tokens if isinstance(tokens, bytes) else encode_tokens(tokens)
        started = time.perf_counter_ns()
        hit = self.shared.index().longest_prefix(namespace, token_bytes)
        counters = self.shared.counters
        counters.incr("longest_prefix_ns", time.perf_counter_ns() - started)
        counters.incr("longest_prefix_probes")
        return hit

    def prefix_candidates(
        self, namespace: Namespace, tokens: TokenInput | bytes, limit: int = 8, min_tokens: int = 1
    ) -> list[tuple[RowInfo, int]]:
        """Rows that can serve a prompt, best first, with the tokens each shares with it.

        The first is `longest_prefix`'s ``common`` row; rows that are whole
        prefixes of the prompt come where their length puts them. For a model
        that may have to pass over a row (one it may not use, or one that fails
        to load). Reads the trie without the mailbox.
        """
        token_bytes = tokens if isinstance(tokens, bytes) else encode_tokens(tokens)
        started = time.perf_counter_ns()
        found = self.shared.index().prefix_candidates(namespace, token_bytes, limit, min_tokens)
        counters = self.shared.counters
        counters.incr("longest_prefix_ns", time.perf_counter_ns() - started)
        counters.incr("longest_prefix_probes")
        return found

    def longest_prefix_stride(
        self, namespace: Namespace, tokens: TokenInput | bytes, stride: int, minimum: int
    ) -> tuple[int, RowInfo] | None:
        """The original's walk: probe exact keys of stride-aligned prefixes, longest first.

        Returns (length, row) or None. Counts probes and time (no mailbox).
        """
        if stride <= 0 or minimum < 0:
            raise ValueError("stride must be positive and minimum non-negative")
        token_bytes = tokens if isinstance(tokens, bytes) else encode_tokens(tokens)
        started = time.perf_counter_ns()
        n = len(token_bytes) // 4
        floor = max(minimum, stride)
        lengths = list(range((n // stride) * stride, floor - 1, -stride))
        index = self.shared.index()
        found: tuple[int, RowInfo] | None = None
        probes = 0
        for length, key in zip(lengths, prefix_keys(namespace, token_bytes, lengths), strict=True):
            probes += 1
            info = index.lookup_exact(key)
            if info is not None:
                found = (length, info)
                break
        counters = self.shared.counters
        counters.incr("longest_prefix_probes", probes)
        counters.incr("longest_prefix_ns", time.perf_counter_ns() - started)
        return found

    # ------------------------------------------------------------------ claim / load / checkin

    def claim(self, key: bytes, tier: str | None = None) -> Claim | None:
        """Pin a row (its fastest copy, or the one in `tier`) until `checkin` (mailbox)."""
        return self._meta.ask.claim(key, tier)

    def load(
        self, claim: Claim, allocate: Allocator | None = None, *, promote: bool | None = None
    ) -> memoryview | None:
        """Read a claimed row's payload, verified (checksum and key); None if it is corrupt.

        Runs in this thread (no mailbox). A file row is read into one buffer
        from `allocate(n)` (default a new bytearray); a RAM row is returned as a
        read-only view of the stored payload, without a copy, unless `allocate`
        is given. A corrupt row is removed from the index, its file deleted and
        ``corrupt_files`` counted. A file hit may be promoted to RAM (default:
        the ``promote_on_hit`` setting; only with the default allocator).

        Raises:
            OSError: the file could not be read (not a corruption: nothing is removed).
        """
        started = time.perf_counter_ns()
        try:
            if claim.kind == "ram":
                return self._load_ram(claim, allocate)
            path = claim.path
            assert path is not None
            store = self.shared.files[claim.tier]
            try:
                payload = store.load(path, claim.key, allocate)
            except CacheFormatError as exc:
                self.drop(claim, exc.reason)
                self.shared.counters.incr("load_misses")
                return None
            except FileNotFoundError:
                self._meta.tell.remove_corrupt(claim.key, claim.tier, "missing")
                self.shared.counters.incr("load_misses")
                return None
            self.count_load(payload.nbytes, copied=payload.nbytes)  # file -> one buffer
            if promote is None:
                promote = self.shared.settings.promote_on_hit and allocate is None
            if promote:
                obj = payload.obj
                self.promote(
                    claim, obj if allocate is None and isinstance(obj, bytearray) else payload
                )
            return payload.toreadonly()
        finally:
            self.shared.counters.incr("load_total_ns", time.perf_counter_ns() - started)

    def _load_ram(self, claim: Claim, allocate: Allocator | None) -> memoryview | None:
        entry = self.shared.ram.get(claim.key)
        if entry is None:
            self.shared.counters.incr("load_misses")
            return None
        view = entry.view()
        if claim.checksum is not None and not has_checksum(view, claim.checksum):
            self.reject(claim)
            return None
        if allocate is None:
            self.count_load(view.nbytes, copied=0)
            return view
        target = memoryview(allocate(view.nbytes)).cast("B")
        target[: view.nbytes] = view
        self.count_load(view.nbytes, copied=view.nbytes)
        return target[: view.nbytes].toreadonly()

    def load_ram_unverified(self, claim: Claim) -> memoryview | None:
        """A claimed RAM row's payload, without a copy and not yet verified: the caller
        checks it against ``claim.checksum`` (`payload.has_checksum`, while the restore
        runs) before it samples anything from a state restored from it, and hands a
        mismatch to `reject`. None if the row is gone."""
        assert claim.kind == "ram"
        entry = self.shared.ram.get(claim.key)
        if entry is None:
            self.shared.counters.incr("load_misses")
            return None
        view = entry.view()
        self.count_load(view.nbytes, copied=0)
        return view

    def reject(self, claim: Claim) -> None:
        """A claimed row's payload did not have its checksum: remove it and count it as
        `load` does with a corrupt one."""
        self._meta.tell.remove_corrupt(claim.key, claim.tier, CHECKSUM_MISMATCH)
        self.shared.counters.incr("load_misses")

    def count_load(self, nbytes: int, *, copied: int) -> None:
        """Count `nbytes` of payload loaded, `copied` of them copied on the way
        (``loaded_bytes``, ``load_bytes_copied``); for callers that copy a loaded view."""
        counters = self.shared.counters
        counters.incr("loaded_bytes", nbytes)
        counters.incr("load_bytes_copied", copied)

    @property
    def promotes_on_hit(self) -> bool:
        """Whether hits in a slower tier are copied to RAM (``promote_on_hit``)."""
        return self.shared.settings.promote_on_hit

    def ram_payload(self, claim: Claim) -> Payload | None:
        """The stored payload object of a claimed RAM row (for zero-copy handoff), or None."""
        entry = self.shared.ram.get(claim.key)
        return None if entry is None else entry.payload

    def drop(self, claim: Claim, reason: str) -> None:
        """Remove a claimed row that turned out unusable (mailbox, without waiting)."""
        self._meta.tell.remove_corrupt(claim.key, claim.tier, reason)

    def checkin(self, claim: Claim) -> None:
        """Release a claim's pin (mailbox, without waiting)."""
        self._meta.tell.checkin(claim.holder)

    def promote(self, claim: Claim, payload: Payload, *, owns_payload: bool = False) -> bool:
        """Copy a slower tier's hit into RAM, by reference (mailbox, without waiting).

        Returns False when there is no RAM tier or the row is already in RAM.
        """
        index = self.shared.index()
        try:
            ram = index.resolve_tier("ram")
        except CacheError:
            return False
        if claim.tier == ram or index.row(claim.key, ram) is not None:
            return False
        view = payload_view(payload)
        entry = RamEntry(
            key=claim.key,
            namespace=claim.namespace,
            tokens=claim.tokens,
            reason=claim.reason,
            created_ns=time.time_ns(),
            checksum=claim.checksum if claim.checksum is not None else payload_checksum(view),
            size=view.nbytes,
            payload=payload
            if owns_payload or isinstance(payload, bytes | bytearray)
            else bytes(view),
        )
        self._meta.tell.promote(entry, ram)
        return True

    def fetch(self, key: bytes) -> bytes | None:
        """Claim, load, copy out and check in: the whole payload as bytes, or None."""
        claim = self.claim(key)
        if claim is None:
            return None
        try:
            view = self.load(claim)
            if view is None:
                return None
            self.count_load(0, copied=view.nbytes)  # the copy out to bytes
            return bytes(view)
        finally:
            self.checkin(claim)

    # ------------------------------------------------------------------ inspection (no mailbox)

    def rows(self) -> list[RowInfo]:
        """Every row and every save in flight."""
        return self.shared.index().rows()

    def counters(self) -> CounterSnapshot:
        """Every counter and per-tier statistics (no mailbox)."""
        index = self.shared.index()
        with index.lock:
            stats = tuple(
                TierStats(
                    name=tier,
                    kind=index.tier_settings(tier).kind,
                    quota_bytes=index.tier_settings(tier).quota_bytes,
                    bytes=index.used_bytes(tier) - index.reserved_bytes(tier),
                    rows=index.tier_rows(tier),
                    reserved_bytes=index.reserved_bytes(tier),
                    hits=index.tier_counts(tier)[0],
                    evictions=index.tier_counts(tier)[1],
                    promotions=index.tier_counts(tier)[2],
                    demotions=index.tier_counts(tier)[3],
                    demotions_in=index.demotions_in(tier),
                )
                for tier in index.tier_names
            )
        return self.shared.counters.snapshot(stats)

    def count(self, counter: str, amount: int = 1) -> None:
        """Add to one of the cache's counters (a model's hits and misses; no mailbox).

        Raises:
            KeyError: no such counter (`erllama_py.cache.counters.COUNTER_NAMES`).
        """
        self.shared.counters.incr(counter, amount)

    def reset_counters(self) -> None:
        """Zero every counter but the byte gauges."""
        self.shared.counters.reset()

    # ------------------------------------------------------------------ maintenance (mailbox)

    def gc(self) -> int:
        """Evict every unpinned row of every tier; returns how many."""
        return self._meta.ask.gc()

    def evict_bytes(self, target: int, tiers: Sequence[str] | None = None) -> tuple[int, int]:
        """Evict least recently used unpinned rows (demoting RAM rows when configured)
        until `target` bytes are freed; returns (rows, bytes)."""
        return self._meta.ask.evict_bytes(target, None if tiers is None else list(tiers))

    def sweep(self) -> int:
        """Clean stale reservations now; returns how many files were adopted."""
        return self._meta.ask.sweep()

    def check(self) -> list[str]:
        """Cross-examine index and tiers; one line per problem (empty = sound)."""
        return self._meta.ask.check()

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no save is in flight (writers drained)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.shared.index().reservations() and not self.shared.jobs_in_flight():
                return
            time.sleep(0.005)
        raise TimeoutError("saves still in flight")

    # ------------------------------------------------------------------ lifecycle

    def mark_stopped(self) -> None:
        """The tree this cache ran in has stopped: every later call raises
        `RuntimeStoppedError`; the tier roots are free for another runtime."""
        self.shared.stopped = True
        self.shared.roots.release()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the cache's actors (waiting for saves in flight), if this handle started them."""
        if self.shared.stopped:
            return
        with contextlib.suppress(TimeoutError, RuntimeStoppedError):
            self.wait_idle(timeout)
        if self._sup is not None and self._sup.is_alive():
            self._sup.stop(block=True, timeout=timeout)
        self.shared.stopped = True
        self.shared.ram.clear()
        self.shared.roots.release()

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
