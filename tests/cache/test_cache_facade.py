"""The running cache through its public facade (`erllama_py.cache.start` / `CacheHandle`).

Ports spec 6.5 (disk tier), 6.6 (ram_file tier), 6.7 (RAM tier), 6.8 (writer) and 6.9
(counters) to the running tree, then covers what the original lacked: exact-or-wait,
longest prefix (trie and stride walk), pins, promotion, demotion, quotas per tier, and
every kind of payload buffer.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from erllama_py.cache import CacheHandle, Namespace, RowInfo, key_hex, kvc
from erllama_py.cache.counters import COUNTER_NAMES
from erllama_py.cache.filestore import FileStore
from erllama_py.cache.rootlock import LOCK_NAME
from erllama_py.errors import (
    CacheError,
    InvalidTokensError,
    ReservationError,
    UnknownTierError,
)
from supervisors import ActorKilledError, which_children

KB = 1024
MB = 1024 * KB

ORIGINAL_COUNTERS = (
    "hits_exact", "hits_resume", "misses", "saves_cold", "saves_continued", "saves_finish",
    "saves_evict", "saves_shutdown", "evictions", "corrupt_files", "pack_total_ns",
    "load_total_ns", "bytes_ram", "bytes_ramfile", "bytes_disk", "duplicate_dropped",
    "hits_longest_prefix", "longest_prefix_probes", "longest_prefix_ns", "saves_dropped",
)  # fmt: skip


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible bytes."""
    return random.Random(seed).randbytes(size)


def rows_of(cache: CacheHandle, key: bytes) -> list[RowInfo]:
    """Every copy (and save in flight) of `key`."""
    return [r for r in cache.rows() if r.key == key]


def tier_of(cache: CacheHandle, kind: str) -> str:
    """The full tier name of a kind (``disk`` -> ``disk:<root>``)."""
    return cache.shared.index().resolve_tier(kind)


def kvc_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.kvc")) if root.exists() else []


def temp_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.tmp")) if root.exists() else []


def write_row_file(path: Path, ns: Namespace, tokens: list[int], body: bytes) -> bytes:
    """Write a valid row file at `path` (whatever its name) and return its key."""
    prefix, key = kvc.build_prefix(ns, tokens, body, "cold")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(prefix + body)
    return key


class GatedPayload:
    """A payload the writer pool cannot read until `gate` is set.

    Framing reads it in the caller's thread at once; the writer's read (any other thread)
    sets `entered`, waits for `gate`, then raises `fail_with` if given. This holds a save
    in flight for as long as a test needs, without sleeping.
    """

    def __init__(self, data: bytes, *, fail_with: BaseException | None = None) -> None:
        self.data = data
        self.owner = threading.get_ident()
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail_with = fail_with

    def view(self) -> memoryview:
        if threading.get_ident() != self.owner:
            self.entered.set()
            assert self.gate.wait(30.0), "the test never opened the gate"
            if self.fail_with is not None:
                raise self.fail_with
        return memoryview(self.data)


# --------------------------------------------------------------------------- disk tier (6.5)


def test_disk_save_then_load_round_trips_the_payload(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path]
) -> None:
    body = payload(100 * KB)
    key = cache.save(ns, [1, 2, 3], body, tier="disk", reason="cold")
    assert key == cache.key(ns, [1, 2, 3])
    (info,) = rows_of(cache, key)
    assert info.tier == f"disk:{roots['disk']}"
    assert info.kind == "disk"
    assert info.status == "available"
    assert info.path == roots["disk"] / f"{key_hex(key)}.kvc"
    assert info.size == info.path.stat().st_size > len(body)
    claim = cache.claim(key)
    assert claim is not None and claim.tier == info.tier
    try:
        loaded = cache.load(claim, promote=False)
    finally:
        cache.checkin(claim)
    assert loaded is not None and bytes(loaded) == body
    assert cache.check() == []


def test_disk_save_writes_exactly_one_file_and_leaves_no_temp(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path]
) -> None:
    key = cache.save(ns, [7] * 50, payload(10 * KB), tier="disk")
    assert [p.name for p in kvc_files(roots["disk"])] == [f"{key_hex(key)}.kvc"]
    assert temp_files(roots["disk"]) == []
    assert kvc_files(roots["ram_file"]) == []
    assert cache.check() == []


def test_an_unknown_key_misses_on_lookup_claim_and_fetch(cache: CacheHandle, ns: Namespace) -> None:
    key = cache.key(ns, [42])
    assert cache.lookup_exact(ns, [42]) is None
    assert cache.lookup_key(key) is None
    assert cache.claim(key) is None
    assert cache.fetch(key) is None
    assert cache.rows() == []


def test_evicting_a_disk_row_deletes_its_file(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path]
) -> None:
    key = cache.save(ns, [1, 2], payload(4 * KB), tier="disk")
    path = roots["disk"] / f"{key_hex(key)}.kvc"
    assert path.exists()
    assert cache.gc() == 1
    assert not path.exists()
    assert cache.rows() == []
    assert cache.counters().evictions == 1
    assert cache.counters().bytes_disk == 0
    assert cache.check() == []


def test_a_tampered_payload_is_detected_at_load_and_its_row_and_file_removed(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path], wait_until: Any
) -> None:
    body = payload(64 * KB)
    key = cache.save(ns, [5, 6, 7], body, tier="disk")
    path = roots["disk"] / f"{key_hex(key)}.kvc"
    with path.open("r+b") as f:  # same length, last 8 bytes changed
        f.seek(-8, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in body[-8:]))
    claim = cache.claim(key)
    assert claim is not None
    assert cache.load(claim) is None  # a miss, never the tampered bytes
    cache.checkin(claim)
    wait_until(lambda: cache.lookup_key(key) is None, "the corrupt row to leave the index")
    assert not path.exists()
    counters = cache.counters()
    assert counters.corrupt_files == 1
    assert counters.load_misses == 1
    assert counters.promotions == 0
    assert cache.claim(key) is None
    assert cache.check() == []


def test_startup_sweeps_temp_files(make_cache: Any, roots: dict[str, Path]) -> None:
    disk = roots["disk"]
    disk.mkdir(parents=True)
    (disk / "x.kvc.tmp").write_bytes(b"partial")
    (disk / "x.kvc.foo.tmp").write_bytes(b"partial")
    cache = make_cache()
    assert temp_files(disk) == []
    assert cache.counters().temp_files_swept == 2
    assert cache.rows() == []


def test_startup_registers_existing_valid_files(
    make_cache: Any, ns: Namespace, roots: dict[str, Path]
) -> None:
    bodies = {i: payload(3 * KB + i, seed=i) for i in range(5)}
    first = make_cache()
    keys = {i: first.save(ns, [i, i + 1], body, tier="disk") for i, body in bodies.items()}
    first.stop()
    second = make_cache()
    disk = tier_of(second, "disk")
    for i, key in keys.items():
        info = second.lookup_key(key)
        assert info is not None and info.tier == disk and info.n_tokens == 2
        assert second.fetch(key) == bodies[i]
    assert second.counters().bytes_disk == sum(p.stat().st_size for p in kvc_files(roots["disk"]))
    assert second.check() == []


def test_startup_deletes_corrupt_files_and_counts_them(
    make_cache: Any, ns: Namespace, roots: dict[str, Path]
) -> None:
    disk = roots["disk"]
    disk.mkdir(parents=True)
    junk = disk / f"{'ab' * 16}.kvc"
    junk.write_bytes(b"this is not a row" * 10)
    empty = disk / f"{'cd' * 16}.kvc"
    empty.write_bytes(b"")
    good = write_row_file(disk / "placeholder.kvc", ns, [1], b"payload")
    cache = make_cache()
    assert not junk.exists() and not empty.exists()
    assert cache.counters().corrupt_files == 2
    assert [r.key for r in cache.rows()] == [good]
    assert cache.check() == []


def test_startup_renames_a_valid_file_found_under_a_wrong_name(
    make_cache: Any, ns: Namespace, roots: dict[str, Path]
) -> None:
    disk = roots["disk"]
    wrong = disk / f"{'00' * 16}.kvc"
    key = write_row_file(wrong, ns, [9, 9, 9], b"renamed payload")
    cache = make_cache()
    right = disk / f"{key_hex(key)}.kvc"
    assert not wrong.exists() and right.exists()
    info = cache.lookup_key(key)
    assert info is not None and info.path == right
    assert cache.fetch(key) == b"renamed payload"
    assert cache.check() == []


def test_startup_drops_a_duplicate_found_under_a_wrong_name(
    make_cache: Any, ns: Namespace, roots: dict[str, Path]
) -> None:
    disk = roots["disk"]
    key = write_row_file(disk / "placeholder.kvc", ns, [3, 1, 4], b"the right one")
    right = disk / f"{key_hex(key)}.kvc"
    (disk / "placeholder.kvc").rename(right)
    write_row_file(disk / "zz-copy.kvc", ns, [3, 1, 4], b"a copy under a wrong name")
    cache = make_cache()
    assert [p.name for p in kvc_files(disk)] == [right.name]
    assert cache.fetch(key) == b"the right one"
    assert cache.check() == []


def test_a_valid_file_already_under_the_final_name_is_adopted_first_file_wins(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path]
) -> None:
    # A file published by someone else (another process, a crashed writer) but not indexed.
    key = write_row_file(
        roots["disk"] / f"{key_hex(cache.key(ns, [8, 8]))}.kvc", ns, [8, 8], b"first"
    )
    ticket = cache.save_async(ns, [8, 8], b"second", tier="disk")
    result = ticket.result(10)
    assert result.status == "adopted"
    assert cache.fetch(key) == b"first"
    assert cache.counters().adoptions == 1
    assert len(kvc_files(roots["disk"])) == 1
    assert cache.check() == []


def test_a_corrupt_file_under_the_final_name_is_replaced(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path]
) -> None:
    key = cache.key(ns, [8, 9])
    final = roots["disk"] / f"{key_hex(key)}.kvc"
    final.write_bytes(b"EKVC garbage")
    result = cache.save_async(ns, [8, 9], b"new payload", tier="disk").result(10)
    assert result.status == "saved"
    assert cache.fetch(key) == b"new payload"
    assert cache.check() == []


# --------------------------------------------------------------------------- ram_file tier (6.6)


def test_ram_file_save_then_load_round_trips(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path]
) -> None:
    body = payload(200 * KB)
    key = cache.save(ns, [4, 5, 6], body, tier="ram_file")
    (info,) = rows_of(cache, key)
    assert info.kind == "ram_file"
    assert info.path is not None and info.path.parent == roots["ram_file"]
    assert cache.fetch(key) == body
    assert cache.check() == []


def test_ram_file_rows_are_registered_with_their_tier_label_after_a_restart(
    make_cache: Any, ns: Namespace, roots: dict[str, Path]
) -> None:
    first = make_cache()
    key = first.save(ns, [1, 2, 3, 4], b"on tmpfs", tier="ram_file")
    first.stop()
    second = make_cache()
    info = second.lookup_key(key)
    assert info is not None
    assert info.tier == f"ram_file:{roots['ram_file']}"
    assert info.kind == "ram_file"
    assert info.path == roots["ram_file"] / f"{key_hex(key)}.kvc"
    assert second.check() == []


def test_evicting_a_ram_file_row_deletes_its_file(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path]
) -> None:
    key = cache.save(ns, [1, 1, 2], payload(KB), tier="ram_file")
    assert len(kvc_files(roots["ram_file"])) == 1
    assert cache.gc() == 1
    assert kvc_files(roots["ram_file"]) == []
    assert cache.lookup_key(key) is None
    assert cache.counters().bytes_ramfile == 0


# --------------------------------------------------------------------------- RAM tier (6.7)


def test_ram_save_then_load_returns_the_stored_payload_without_a_copy(
    cache: CacheHandle, ns: Namespace
) -> None:
    body = payload(300 * KB)
    key = cache.save(ns, [1, 2, 3], body, tier="ram")
    claim = cache.claim(key)
    assert claim is not None and claim.kind == "ram"
    try:
        view = cache.load(claim)
        assert view is not None and view.readonly
        assert view.obj is body  # the row keeps the caller's immutable bytes by reference
        copied = cache.load(claim, allocate=bytearray)
        assert copied is not None and bytes(copied) == body and copied.obj is not body
    finally:
        cache.checkin(claim)


def test_a_ram_save_registers_its_row(cache: CacheHandle, ns: Namespace) -> None:
    key = cache.save(ns, [10, 20], b"12345", tier="ram", reason="continued")
    (info,) = rows_of(cache, key)
    assert (info.tier, info.kind, info.status, info.size, info.path) == (
        "ram",
        "ram",
        "available",
        5,
        None,
    )
    assert (info.n_tokens, info.reason, info.refcount, info.hits) == (2, "continued", 0, 0)
    assert cache.check() == []


def test_ram_byte_gauges_are_exact_and_fall_back_to_zero_after_eviction(
    cache: CacheHandle, ns: Namespace
) -> None:
    cache.save(ns, [1], b"abc", tier="ram")
    cache.save(ns, [2], b"defgh", tier="ram")
    counters = cache.counters()
    (ram,) = [t for t in counters.tiers if t.name == "ram"]
    assert counters.bytes_ram == ram.bytes == cache.shared.ram.total_bytes() == 3 + 5
    assert ram.rows == 2
    assert cache.gc() == 2
    assert len(cache.shared.ram) == 0
    counters = cache.counters()
    assert counters.bytes_ram == 0
    assert [t.bytes for t in counters.tiers if t.name == "ram"] == [0]
    assert cache.check() == []


def test_evicting_ram_rows_skips_a_pinned_row(cache: CacheHandle, ns: Namespace) -> None:
    kept = cache.save(ns, [1], b"pinned", tier="ram")
    gone = cache.save(ns, [2], b"unpinned", tier="ram")
    claim = cache.claim(kept)
    assert claim is not None
    assert cache.gc() == 1
    assert cache.lookup_key(kept) is not None and cache.lookup_key(gone) is None
    assert cache.shared.ram.get(kept) is not None and cache.shared.ram.get(gone) is None
    assert cache.counters().bytes_ram == len(b"pinned")
    cache.checkin(claim)
    assert cache.gc() == 1
    assert cache.rows() == []


# --------------------------------------------------------------------------- writer (6.8)


@pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
def test_a_second_identical_save_is_already_present_and_counted_as_a_duplicate(
    cache: CacheHandle, ns: Namespace, tier: str
) -> None:
    first = cache.save_async(ns, [1, 2, 3], b"same", tier=tier).result(10)
    second = cache.save_async(ns, [1, 2, 3], b"same", tier=tier).result(10)
    assert (first.status, second.status) == ("saved", "already_present")
    assert first.key == second.key
    counters = cache.counters()
    assert counters.duplicate_dropped == 1
    assert counters.saves_finish == 1
    assert counters.saves_dropped == 0
    assert len(rows_of(cache, first.key)) == 1
    assert cache.check() == []


def test_a_save_that_fails_after_its_reservation_leaves_no_writing_row(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], wait_until: Any
) -> None:
    cache = make_cache(writers=1)
    # The writer cannot read the payload (a shared buffer released after save_async returned).
    bad = GatedPayload(payload(8 * KB), fail_with=ValueError("the shared buffer was released"))
    bad.gate.set()
    ticket = cache.save_async(ns, [3, 3, 3], bad, tier="disk")
    with pytest.raises(ValueError, match="released"):
        ticket.result(10)
    wait_until(lambda: not rows_of(cache, ticket.key), "the reservation to be cancelled")
    assert temp_files(roots["disk"]) == [] and kvc_files(roots["disk"]) == []
    # The key is not poisoned: saving it again works at once.
    assert cache.save_async(ns, [3, 3, 3], b"good", tier="disk").result(10).status == "saved"
    assert cache.fetch(ticket.key) == b"good"
    assert cache.check() == []


@pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
@pytest.mark.parametrize(
    "refusal",
    [
        (12345, {}, (TypeError, ValueError)),
        ([1, 2, 3], {}, (TypeError, ValueError)),
        (b"ok", {"reason": "bogus"}, ValueError),
        (b"ok", {"extra": {"fingerprint": b"reserved key"}}, ValueError),
    ],
    ids=["int-payload", "list-payload", "unknown-reason", "reserved-extra"],
)
def test_a_save_refused_before_writing_leaves_no_row_and_no_file(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path], tier: str, refusal: Any
) -> None:
    body, options, error = refusal
    with pytest.raises(error):
        cache.save(ns, [1, 2], body, tier=tier, **options)
    assert cache.rows() == []
    assert kvc_files(roots["disk"]) == [] and kvc_files(roots["ram_file"]) == []
    assert temp_files(roots["disk"]) == [] and temp_files(roots["ram_file"]) == []
    assert cache.check() == []


def test_saves_with_bad_tokens_or_tiers_are_refused(cache: CacheHandle, ns: Namespace) -> None:
    with pytest.raises(InvalidTokensError):
        cache.save(ns, [1, -1], b"x", tier="disk")
    with pytest.raises(InvalidTokensError):
        cache.save(ns, [2**32], b"x", tier="ram")
    with pytest.raises(UnknownTierError):
        cache.save(ns, [1], b"x", tier="nvme")
    assert cache.rows() == []


def test_a_killed_writers_queued_saves_fail_and_its_reservations_are_cleaned(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], wait_until: Any
) -> None:
    cache = make_cache(writers=1)
    writers = cache.shared.registry.lookup("cache_writers")
    # The kill lands while the writer reads the first payload, as a supervisor's kill does
    # (ActorKilledError raised in the writer's thread).
    stuck = GatedPayload(payload(16 * KB), fail_with=ActorKilledError())
    first = cache.save_async(ns, [1], stuck, tier="disk")
    assert stuck.entered.wait(10)
    queued = [cache.save_async(ns, [2, i], payload(KB, i), tier="disk") for i in range(3)]
    assert {r.status for r in cache.rows()} == {"writing"}
    stuck.gate.set()
    for ticket in [first, *queued]:
        with pytest.raises((CacheError, ActorKilledError)):
            ticket.result(10)  # failed, not lost: nobody waits forever
    wait_until(
        lambda: which_children(writers)[0].restarts == 1 and which_children(writers)[0].handle,
        "the writer pool to restart its writer",
    )
    wait_until(lambda: cache.rows() == [], "the dead writer's reservations to be cleaned")
    assert temp_files(roots["disk"]) == [] and kvc_files(roots["disk"]) == []
    # The restarted writer takes new saves, including the keys the dead one held.
    for ticket in queued:
        cache.save(ns, [2, queued.index(ticket)], b"again", tier="disk")
    assert len(kvc_files(roots["disk"])) == 3
    assert cache.check() == []


@pytest.mark.parametrize(
    "failure",
    [OSError(5, "Input/output error (fsync of the directory)"), ActorKilledError()],
    ids=["io-error", "killed"],
)
def test_a_writer_failing_right_after_link_leaves_its_file_adopted_not_orphaned(
    make_cache: Any,
    ns: Namespace,
    roots: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    failure: BaseException,
) -> None:
    cache = make_cache(writers=1)
    real_link = FileStore.link

    def link_then_fail(store: FileStore, temp: Path, key: bytes) -> tuple[Path, int, bool]:
        real_link(store, temp, key)  # the file is published under its final name ...
        raise failure  # ... and the writer fails before it can announce it

    monkeypatch.setattr(FileStore, "link", link_then_fail)
    ticket = cache.save_async(ns, [6, 6], b"published, then the writer failed", tier="disk")
    with pytest.raises((CacheError, ActorKilledError)):
        ticket.result(10)
    monkeypatch.setattr(FileStore, "link", real_link)
    # The writer's cancel (sent before its error reached us) had the file adopted: the index
    # never ignores a published file.
    assert [r.status for r in rows_of(cache, ticket.key)] == ["available"]
    assert cache.fetch(ticket.key) == b"published, then the writer failed"
    assert [p.name for p in roots["disk"].iterdir() if p.name != LOCK_NAME] == [
        f"{key_hex(ticket.key)}.kvc"
    ]
    assert (
        cache.counters().bytes_disk == (roots["disk"] / f"{key_hex(ticket.key)}.kvc").stat().st_size
    )
    assert cache.check() == []


def test_a_save_does_not_queue_behind_a_busy_writer_while_another_is_idle(
    make_cache: Any, ns: Namespace
) -> None:
    cache = make_cache(writers=2)
    busy = GatedPayload(payload(KB))
    held = cache.save_async(ns, [1], busy, tier="disk")
    assert busy.entered.wait(10)
    for i in range(3):  # each goes to the idle writer and completes while the gate is shut
        assert cache.save_async(ns, [2, i], b"quick", tier="disk").result(10).status == "saved"
    busy.gate.set()
    assert held.result(10).status == "saved"
    assert cache.check() == []


def test_a_slow_writer_whose_reservation_expired_abandons_without_publishing(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], wait_until: Any
) -> None:
    cache = make_cache(writers=2, reservation_ttl_s=0.2)
    slow = GatedPayload(b"the slow writer's bytes")
    first = cache.save_async(ns, [4, 2], slow, tier="disk")
    assert slow.entered.wait(10)

    def swept() -> bool:
        cache.sweep()
        return not rows_of(cache, first.key)

    wait_until(swept, "the sweep to expire the stuck reservation")
    second = cache.save_async(ns, [4, 2], b"the second writer's bytes", tier="disk")
    assert second.result(10).status == "saved"
    slow.gate.set()
    with pytest.raises(ReservationError) as caught:
        first.result(10)
    assert caught.value.reason == "expired"
    assert cache.fetch(first.key) == b"the second writer's bytes"
    assert [p.name for p in roots["disk"].iterdir() if p.name != LOCK_NAME] == [
        f"{key_hex(first.key)}.kvc"
    ]
    assert cache.check() == []


# --------------------------------------------------------------------------- counters (6.9)


def test_counters_name_every_counter_of_the_original_and_start_at_zero(
    cache: CacheHandle,
) -> None:
    snapshot = cache.counters().to_dict()
    assert set(ORIGINAL_COUNTERS) <= set(snapshot)
    assert set(COUNTER_NAMES) == set(snapshot) - {"tiers"}
    assert all(snapshot[name] == 0 for name in COUNTER_NAMES)
    assert [t["kind"] for t in snapshot["tiers"]] == ["ram", "ram_file", "disk"]


def test_counters_count_saves_by_reason_and_evictions(cache: CacheHandle, ns: Namespace) -> None:
    for i, reason in enumerate(["cold", "continued", "finish", "evict", "shutdown", "cold"]):
        cache.save(ns, [i], b"x" * (i + 1), tier="disk" if i % 2 else "ram", reason=reason)
    counters = cache.counters()
    assert (counters.saves_cold, counters.saves_continued, counters.saves_finish) == (2, 1, 1)
    assert (counters.saves_evict, counters.saves_shutdown) == (1, 1)
    assert counters.bytes_ram == 1 + 3 + 5
    assert cache.gc() == 6
    assert cache.counters().evictions == 6


def test_reset_counters_zeroes_every_counter_but_the_byte_gauges(
    cache: CacheHandle, ns: Namespace
) -> None:
    key = cache.save(ns, [1, 2], b"abcd", tier="ram")
    cache.save(ns, [1, 2], b"abcd", tier="ram")
    assert cache.fetch(key) == b"abcd"
    before = cache.counters()
    assert before.saves_finish == 1 and before.duplicate_dropped == 1
    assert before.load_total_ns > 0
    cache.reset_counters()
    after = cache.counters()
    assert after.bytes_ram == 4
    assert all(getattr(after, name) == 0 for name in COUNTER_NAMES if not name.startswith("bytes_"))
    assert [t.rows for t in after.tiers] == [1, 0, 0]


# --------------------------------------------------------------------------- lookups


def test_lookup_exact_returns_the_fastest_copy(cache: CacheHandle, ns: Namespace) -> None:
    key = cache.save(ns, [1, 2], b"on disk", tier="disk")
    assert cache.lookup_exact(ns, [1, 2]).kind == "disk"  # type: ignore[union-attr]
    cache.save(ns, [1, 2], b"on disk", tier="ram")
    info = cache.lookup_exact(ns, [1, 2])
    assert info is not None and info.kind == "ram" and info.key == key
    assert {r.kind for r in rows_of(cache, key)} == {"ram", "disk"}
    assert cache.lookup_exact(ns, [1, 2, 3]) is None
    assert cache.lookup_exact(ns, [1]) is None


def test_lookup_exact_or_wait_returns_at_once_when_the_row_is_available(
    cache: CacheHandle, ns: Namespace
) -> None:
    key = cache.save(ns, [1, 2, 3], b"x", tier="disk")
    started = time.monotonic()
    info = cache.lookup_exact_or_wait(key, 30.0)
    assert info is not None and info.key == key
    assert time.monotonic() - started < 5.0  # did not wait out its 30 s: a generous margin


def test_lookup_exact_or_wait_returns_none_at_once_when_nothing_is_in_flight(
    cache: CacheHandle, ns: Namespace
) -> None:
    started = time.monotonic()
    assert cache.lookup_exact_or_wait(cache.key(ns, [4, 5, 6]), 30.0) is None
    assert time.monotonic() - started < 5.0  # did not wait out its 30 s: a generous margin


def test_lookup_exact_or_wait_waits_for_a_save_in_flight_and_gets_its_row(
    cache: CacheHandle, ns: Namespace
) -> None:
    gated = GatedPayload(payload(32 * KB))
    ticket = cache.save_async(ns, [7, 7, 7], gated, tier="disk")
    assert gated.entered.wait(10)
    answer: Future[RowInfo | None] = Future()
    waiter = threading.Thread(
        target=lambda: answer.set_result(cache.lookup_exact_or_wait(ticket.key, 30.0))
    )
    waiter.start()
    with pytest.raises(TimeoutError):
        answer.result(0.2)  # still waiting: the save has not published yet
    gated.gate.set()
    info = answer.result(10)
    waiter.join(10)
    assert info is not None and info.key == ticket.key and info.status == "available"
    assert ticket.result(10).status == "saved"


def test_lookup_exact_or_wait_returns_none_after_its_timeout(
    cache: CacheHandle, ns: Namespace
) -> None:
    gated = GatedPayload(payload(KB))
    ticket = cache.save_async(ns, [8, 8], gated, tier="disk")
    assert gated.entered.wait(10)
    started = time.monotonic()
    assert cache.lookup_exact_or_wait(ticket.key, 0.1) is None
    assert time.monotonic() - started >= 0.1
    gated.gate.set()
    assert ticket.result(10).status == "saved"
    assert cache.lookup_exact_or_wait(ticket.key, 0.1) is not None


def test_lookup_exact_or_wait_gets_none_when_the_save_in_flight_fails(
    cache: CacheHandle, ns: Namespace
) -> None:
    gated = GatedPayload(payload(KB), fail_with=OSError(28, "No space left on device"))
    ticket = cache.save_async(ns, [9, 9], gated, tier="disk")
    assert gated.entered.wait(10)
    answer: Future[RowInfo | None] = Future()
    waiter = threading.Thread(
        target=lambda: answer.set_result(cache.lookup_exact_or_wait(ticket.key, 30.0))
    )
    waiter.start()
    with pytest.raises(TimeoutError):
        answer.result(0.1)
    gated.gate.set()
    assert answer.result(10) is None
    waiter.join(10)
    with pytest.raises(CacheError):
        ticket.result(10)
    assert cache.counters().saves_dropped == 1


def test_longest_prefix_finds_covered_and_common_rows_at_any_length(
    cache: CacheHandle, ns: Namespace, other_ns: Namespace
) -> None:
    base = list(range(1000, 1100))
    short = cache.save(ns, base[:37], b"37", tier="ram")
    long = cache.save(ns, base[:83], b"83", tier="disk")
    cache.save(other_ns, base, b"other model", tier="ram")
    # A prompt extending the long row: covered by it.
    hit = cache.longest_prefix(ns, [*base[:83], 5, 6])
    assert hit is not None and hit.covered is not None and hit.covered.key == long
    assert hit.common_len == 83
    # A prompt diverging inside the long row: covered by the short one, common with the long.
    hit = cache.longest_prefix(ns, [*base[:60], 1, 2, 3])
    assert hit is not None
    assert hit.covered is not None and hit.covered.key == short
    assert hit.common is not None and hit.common.key == long and hit.common_len == 60
    # Shorter than every row: no covering row, the shortest sharing row in common.
    hit = cache.longest_prefix(ns, base[:10])
    assert hit is not None and hit.covered is None
    assert hit.common is not None and hit.common.key == short and hit.common_len == 10
    assert cache.longest_prefix(ns, [1, 2, 3]) is None
    assert cache.longest_prefix(Namespace(bytes(32), "f16", bytes(16)), base) is None
    assert cache.counters().longest_prefix_probes == 5


def test_longest_prefix_stride_walk_finds_the_longest_aligned_row(
    cache: CacheHandle, ns: Namespace
) -> None:
    prompt = [i % 50_000 for i in range(12_000)]
    at_2048 = cache.save(ns, prompt[:2048], b"2048", tier="ram")
    assert cache.longest_prefix_stride(ns, prompt, 2048, 512) == (2048, cache.lookup_key(at_2048))
    at_4096 = cache.save(ns, prompt[:4096], b"4096", tier="disk")
    found = cache.longest_prefix_stride(ns, prompt, 2048, 512)
    assert found is not None and found[0] == 4096 and found[1].key == at_4096
    # Never below the floor max(min, stride): a 1,500-token prompt probes nothing.
    probes = cache.counters().longest_prefix_probes
    assert cache.longest_prefix_stride(ns, prompt[:1500], 2048, 512) is None
    assert cache.counters().longest_prefix_probes == probes
    # An unaligned row is invisible to the walk (the trie finds it).
    cache.save(ns, prompt[:5000], b"5000", tier="ram")
    found = cache.longest_prefix_stride(ns, prompt, 2048, 512)
    assert found is not None and found[0] == 4096
    hit = cache.longest_prefix(ns, prompt)
    assert hit is not None and hit.covered is not None and hit.covered.n_tokens == 5000
    with pytest.raises(ValueError):
        cache.longest_prefix_stride(ns, prompt, 0, 512)


# --------------------------------------------------------------------------- pins


def test_a_claimed_row_survives_gc_and_evict_bytes_until_checked_in(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path]
) -> None:
    key = cache.save(ns, [1, 2, 3], payload(8 * KB), tier="disk")
    claim = cache.claim(key)
    assert claim is not None
    assert cache.gc() == 0
    assert cache.evict_bytes(MB) == (0, 0)
    assert cache.evict_bytes(MB, ["disk"]) == (0, 0)
    assert (roots["disk"] / f"{key_hex(key)}.kvc").exists()
    loaded = cache.load(claim, promote=False)
    assert loaded is not None and len(loaded) == 8 * KB
    cache.checkin(claim)
    assert cache.evict_bytes(1, ["disk"]) == (1, claim.size)
    assert cache.rows() == []
    assert cache.check() == []


def test_claims_are_counted_per_holder(cache: CacheHandle, ns: Namespace) -> None:
    key = cache.save(ns, [4, 4], b"shared", tier="ram")
    first, second = cache.claim(key), cache.claim(key)
    assert first is not None and second is not None and first.holder != second.holder
    assert cache.lookup_key(key).refcount == 2  # type: ignore[union-attr]
    cache.checkin(first)
    cache.checkin(first)  # a second checkin of the same claim is a no-op
    assert cache.gc() == 0
    assert cache.lookup_key(key).refcount == 1  # type: ignore[union-attr]
    assert cache.lookup_key(key).hits == 2  # type: ignore[union-attr]
    cache.checkin(second)
    assert cache.gc() == 1


def test_claiming_a_file_row_persists_its_hit_count_for_the_next_start(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], wait_until: Any
) -> None:
    first = make_cache(promote_on_hit=False)
    key = first.save(ns, [6, 6, 6], b"popular", tier="disk")
    path = roots["disk"] / f"{key_hex(key)}.kvc"
    for _ in range(3):
        assert first.fetch(key) == b"popular"

    def hit_count() -> int:
        raw = path.read_bytes()[kvc.HIT_COUNT_OFFSET : kvc.HIT_COUNT_OFFSET + 4]
        return int.from_bytes(raw, "little")

    wait_until(lambda: hit_count() == 3, "the hit count to reach the file header")
    first.stop()
    second = make_cache()
    assert second.lookup_key(key).hits == 3  # type: ignore[union-attr]
    assert second.fetch(key) == b"popular"  # the rewritten header is still a valid row


# --------------------------------------------------------------------------- tiering


def test_a_disk_hit_is_promoted_to_ram(cache: CacheHandle, ns: Namespace, wait_until: Any) -> None:
    body = payload(50 * KB)
    key = cache.save(ns, [1, 2, 3], body, tier="disk")
    assert cache.fetch(key) == body
    wait_until(lambda: len(rows_of(cache, key)) == 2, "a RAM copy of the disk hit")
    assert {r.kind for r in rows_of(cache, key)} == {"ram", "disk"}
    info = cache.lookup_key(key)
    assert info is not None and info.kind == "ram" and info.size == len(body)
    assert cache.fetch(key) == body
    counters = cache.counters()
    assert counters.promotions == 1 and counters.bytes_ram == len(body)
    assert [t.promotions for t in counters.tiers if t.kind == "ram"] == [1]
    assert cache.check() == []


def test_no_promotion_without_promote_on_hit(make_cache: Any, ns: Namespace) -> None:
    cache = make_cache(promote_on_hit=False)
    key = cache.save(ns, [1, 2, 3], b"stays on disk", tier="disk")
    assert cache.fetch(key) == b"stays on disk"
    assert cache.check() == []  # a barrier: the meta actor has handled every message before
    assert [r.kind for r in rows_of(cache, key)] == ["disk"]
    assert cache.counters().promotions == 0


def test_ram_rows_evicted_under_quota_pressure_are_demoted_to_the_next_tier(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], wait_until: Any
) -> None:
    cache = make_cache(ram=100 * KB, promote_on_hit=False)
    bodies = {i: payload(30 * KB, i) for i in range(6)}
    keys = {i: cache.save(ns, [i], body, tier="ram") for i, body in bodies.items()}
    # 6 x 30 KB into 100 KB of RAM: the three oldest went to ram_file, not away.
    wait_until(lambda: cache.counters().demotions == 3, "three demotions")
    assert cache.counters().tiers[0].bytes <= 100 * KB
    for i, key in keys.items():
        (info,) = rows_of(cache, key)
        assert info.kind == ("ram_file" if i < 3 else "ram")
        assert cache.fetch(key) == bodies[i]
    assert len(kvc_files(roots["ram_file"])) == 3
    assert cache.check() == []


def test_evict_bytes_demotes_ram_rows_oldest_first_and_zero_is_a_no_op(
    cache: CacheHandle, ns: Namespace, wait_until: Any
) -> None:
    old = cache.save(ns, [1], payload(10 * KB, 1), tier="ram")
    new = cache.save(ns, [2], payload(10 * KB, 2), tier="ram")
    assert cache.evict_bytes(0) == (0, 0)
    assert cache.evict_bytes(1, ["ram"]) == (1, 10 * KB)
    wait_until(lambda: cache.counters().demotions == 1, "the demotion")
    assert cache.lookup_key(old).kind == "ram_file"  # type: ignore[union-attr]
    assert cache.lookup_key(new).kind == "ram"  # type: ignore[union-attr]
    assert cache.fetch(old) == payload(10 * KB, 1)
    with pytest.raises(UnknownTierError):
        cache.evict_bytes(1, ["tape"])
    assert cache.check() == []


# --------------------------------------------------------------------------- payload types


def _numpy_2d(data: bytes) -> Any:
    return np.frombuffer(data, dtype=np.float32).reshape(-1, 16).copy()


PAYLOAD_KINDS: dict[str, Callable[[bytes], Any]] = {
    "bytes": bytes,
    "bytearray": bytearray,
    "memoryview": lambda data: memoryview(bytearray(data)),
    "memoryview-u32": lambda data: memoryview(bytearray(data)).cast("I"),
    "numpy-u8": lambda data: np.frombuffer(data, dtype=np.uint8).copy(),
    "numpy-f32-2d": _numpy_2d,
}


@pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
@pytest.mark.parametrize("kind", sorted(PAYLOAD_KINDS))
def test_every_buffer_kind_is_accepted_as_a_payload(
    cache: CacheHandle, ns: Namespace, tier: str, kind: str
) -> None:
    data = payload(64 * KB, seed=len(kind))
    body = PAYLOAD_KINDS[kind](data)
    key = cache.save(ns, [1, 2, 3], body, tier=tier)
    if isinstance(body, bytearray | memoryview | np.ndarray):
        memoryview(body).cast("B")[:4] = b"\0\0\0\0"  # the caller's buffer is its own again
    claim = cache.claim(key)
    assert claim is not None and claim.kind == tier
    try:
        loaded = cache.load(claim, promote=False)
        assert loaded is not None and bytes(loaded) == data
    finally:
        cache.checkin(claim)
    assert cache.check() == []


@pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
def test_an_mmap_is_accepted_as_a_payload(cache: CacheHandle, ns: Namespace, tier: str) -> None:
    data = payload(3 * mmap.PAGESIZE + 5)
    with mmap.mmap(-1, len(data)) as region:
        region.write(data)
        key = cache.save(ns, [4, 5], region, tier=tier)
    assert cache.fetch(key) == data
    assert cache.check() == []


@pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
def test_a_non_contiguous_array_is_refused(cache: CacheHandle, ns: Namespace, tier: str) -> None:
    strided = np.arange(1000, dtype=np.int32)[::2]
    with pytest.raises((TypeError, ValueError)):
        cache.save(ns, [1], strided, tier=tier)
    assert cache.rows() == []


def test_a_payload_handed_over_with_owns_payload_is_kept_by_reference_in_ram(
    cache: CacheHandle, ns: Namespace
) -> None:
    body = bytearray(payload(KB))
    key = cache.save(ns, [1], body, tier="ram", owns_payload=True)
    claim = cache.claim(key)
    assert claim is not None
    assert cache.ram_payload(claim) is body
    cache.checkin(claim)


def test_the_cache_refuses_calls_once_stopped(make_cache: Any, ns: Namespace) -> None:
    from erllama_py.errors import RuntimeStoppedError

    cache = make_cache()
    key = cache.save(ns, [1], b"x", tier="disk")
    cache.stop()
    cache.stop()  # idempotent
    with pytest.raises(RuntimeStoppedError):
        cache.save(ns, [2], b"y", tier="disk")
    with pytest.raises(RuntimeStoppedError):
        cache.claim(key)


def test_two_saves_of_one_key_in_flight_conflict(cache: CacheHandle, ns: Namespace) -> None:
    gated = GatedPayload(payload(KB))
    first = cache.save_async(ns, [5, 5], gated, tier="disk")
    assert gated.entered.wait(10)
    with pytest.raises(ReservationError) as caught:
        cache.save_async(ns, [5, 5], b"other bytes", tier="disk")
    assert caught.value.reason == "conflict"
    gated.gate.set()
    assert first.result(10).status == "saved"
    assert cache.fetch(first.key) == gated.data


def test_counters_count_the_payload_bytes_copied_by_saves_and_loads(
    cache: CacheHandle, ns: Namespace
) -> None:
    body = payload(64 * KB, seed=7)
    ram_key = cache.save(ns, [1], body, tier="ram")  # immutable bytes: kept by reference
    disk_key = cache.save(ns, [2], body, tier="disk")  # written to a file: one copy
    cache.save(ns, [3], bytearray(body), tier="ram")  # a caller's mutable buffer: copied
    counters = cache.counters()
    assert counters.saved_bytes == 3 * len(body)
    assert counters.save_bytes_copied == 2 * len(body)

    for key, copies in ((ram_key, 0), (disk_key, 1)):
        before = cache.counters()
        claim = cache.claim(key)
        assert claim is not None
        try:
            view = cache.load(claim, promote=False)
            assert view is not None and bytes(view) == body
        finally:
            cache.checkin(claim)
        after = cache.counters()
        assert after.loaded_bytes - before.loaded_bytes == len(body)
        assert after.load_bytes_copied - before.load_bytes_copied == copies * len(body)

    before = cache.counters()
    assert cache.fetch(ram_key) == body  # fetch copies out to bytes
    assert cache.counters().load_bytes_copied - before.load_bytes_copied == len(body)


def test_check_accepts_a_file_linked_by_a_save_in_flight(cache: CacheHandle, ns: Namespace) -> None:
    """Between link(2) and the announcement a row's file exists while its row is still
    being written: the check must not call that file unknown (it raced demotions)."""
    from erllama_py.cache.key import encode_tokens
    from erllama_py.cache.meta_client import meta_client
    from erllama_py.cache.rows import ReserveRequest
    from erllama_py.kinds import SaveReason

    disk = tier_of(cache, "disk")
    body = payload(4 * KB, seed=3)
    prefix, key = kvc.build_prefix(ns, [5, 6, 7], body, "cold")
    meta = meta_client(cache.shared).ask
    token = meta.reserve(
        ReserveRequest(
            key,
            disk,
            namespace=ns,
            tokens=encode_tokens([5, 6, 7]),
            size=len(prefix) + len(body),
            reason=SaveReason.COLD,
            writer="test",
        )
    )
    final = cache.shared.files[disk].final_path(key)
    final.write_bytes(prefix + body)  # as if linked, not yet announced
    try:
        assert cache.check() == []
    finally:
        meta.cancel(key, disk, token)  # a writer giving up after link: its file is adopted
    info = cache.lookup_key(key)
    assert info is not None and info.tier == disk
    assert cache.check() == []
