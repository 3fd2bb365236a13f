"""Quotas under stress: tiers filled far past their quotas, from several threads at once.

After every save returns, a tier is within its quota twice over: in the index's
accounting (rows plus saves in flight) and in reality (bytes in the directory, or
payload bytes held in RAM). Pinned rows are never evicted, refusals are clear, RAM
gauges are exact, and rows evicted from RAM are demoted to the next tier.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from erllama_py.cache import CacheHandle, Claim, Namespace, SaveTicket
from erllama_py.cache.rootlock import LOCK_NAME
from erllama_py.errors import PayloadTooLargeError, TierFullError

KB = 1024
MB = 1024 * KB


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def dir_bytes(root: Path) -> int:
    """Bytes held by a tier directory, each inode counted once.

    A file being published has two names for a moment (``link(2)``, then the temp name
    is unlinked); counting names would see it twice.
    """
    seen: dict[tuple[int, int], int] = {}
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name == LOCK_NAME:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # unlinked while we listed
        seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


class QuotaWatch:
    """Checks a tier's quota in the index and in reality; collects every violation."""

    def __init__(self, cache: CacheHandle, kind: str, roots: dict[str, Path]) -> None:
        self.cache = cache
        self.index = cache.shared.index()
        self.tier = self.index.resolve_tier(kind)
        self.kind = kind
        self.quota = self.index.tier_settings(self.tier).quota_bytes
        self.root = roots.get(kind)
        self.violations: list[str] = []
        self.lock = threading.Lock()

    def real_bytes(self) -> int:
        if self.kind == "ram":
            return self.cache.shared.ram.total_bytes()
        assert self.root is not None
        return dir_bytes(self.root)

    def check(self, when: str) -> None:
        stats = next(t for t in self.cache.counters().tiers if t.name == self.tier)
        accounted = stats.bytes + stats.reserved_bytes
        real = self.real_bytes()
        with self.lock:
            if accounted > self.quota:
                self.violations.append(f"{when}: index holds {accounted} > {self.quota}")
            if real > self.quota:
                self.violations.append(f"{when}: {self.kind} really holds {real} > {self.quota}")


def churn(
    cache: CacheHandle,
    ns: Namespace,
    kind: str,
    *,
    threads: int,
    saves: int,
    sizes: tuple[int, int],
    after_save: Callable[[str], None],
    seed: int,
) -> dict[bytes, bytes]:
    """`threads` threads each save `saves` rows of random sizes; returns key -> payload."""
    saved: dict[bytes, bytes] = {}
    lock = threading.Lock()

    def work(worker: int) -> None:
        rng = random.Random(seed * 1000 + worker)
        pending: list[tuple[SaveTicket, bytes]] = []
        for i in range(saves):
            body = payload(rng.randint(*sizes), seed=seed * 100_000 + worker * 1000 + i)
            tokens = [worker, i, seed]
            if rng.random() < 0.3:
                pending.append((cache.save_async(ns, tokens, body, tier=kind), body))
            else:
                key = cache.save(ns, tokens, body, tier=kind)
                with lock:
                    saved[key] = body
            after_save(f"worker {worker} save {i}")
        for ticket, body in pending:
            ticket.result(30)
            with lock:
                saved[ticket.key] = body
            after_save(f"worker {worker} async save {ticket.key.hex()}")

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work, w) for w in range(threads)]:
            future.result(120)
    cache.wait_idle()
    return saved


def assert_index_matches_the_tier(cache: CacheHandle, kind: str, root: Path | None) -> None:
    tier = cache.shared.index().resolve_tier(kind)
    rows = [r for r in cache.rows() if r.tier == tier]
    assert all(r.status == "available" for r in rows)
    stats = next(t for t in cache.counters().tiers if t.name == tier)
    assert stats.bytes == sum(r.size for r in rows) and stats.rows == len(rows)
    if kind == "ram":
        assert cache.shared.ram.total_bytes() == stats.bytes
    else:
        assert root is not None
        assert sorted(p.name for p in root.iterdir() if p.name != LOCK_NAME) == sorted(
            r.path.name
            for r in rows
            if r.path is not None  # every file is a row, no temp file is left
        )
        assert dir_bytes(root) == stats.bytes


@pytest.mark.parametrize("kind", ["ram", "ram_file", "disk"])
def test_filling_a_tier_far_past_its_quota_from_many_threads_never_overfills_it(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], kind: str
) -> None:
    quota = 2 * MB
    cache = make_cache(**{kind: quota}, demote_on_evict=False, writers=2)
    watch = QuotaWatch(cache, kind, roots)
    saved = churn(
        cache,
        ns,
        kind,
        threads=4,
        saves=60,
        sizes=(KB, 200 * KB),
        after_save=watch.check,
        seed=1,
    )
    assert watch.violations == []
    assert sum(len(b) for b in saved.values()) > 10 * quota  # really far past the quota
    counters = cache.counters()
    assert counters.evictions > 0 and counters.saves_dropped == 0
    assert counters.quota_refusals == 0
    assert_index_matches_the_tier(cache, kind, roots.get(kind))
    for info in cache.rows():  # whatever is left is exact
        assert cache.fetch(info.key) == saved[info.key]
    assert cache.check() == []


@pytest.mark.parametrize("kind", ["ram", "ram_file", "disk"])
def test_pinned_rows_are_never_evicted_while_the_tier_churns(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], kind: str
) -> None:
    quota = 2 * MB
    cache = make_cache(**{kind: quota}, promote_on_hit=False, writers=2)
    watch = QuotaWatch(cache, kind, roots)
    tier = watch.tier
    pinned = {
        cache.save(ns, [777, i], payload(100 * KB, -i - 1), tier=kind): payload(100 * KB, -i - 1)
        for i in range(4)
    }
    claims: list[Claim] = []
    for key in pinned:
        claim = cache.claim(key, tier)
        assert claim is not None
        claims.append(claim)
    lost: list[str] = []

    def after_save(when: str) -> None:
        watch.check(when)
        for claim in claims:
            info = next((r for r in cache.rows() if r.key == claim.key and r.tier == tier), None)
            if info is None or info.refcount < 1:
                lost.append(f"{when}: pinned row {claim.key.hex()} gone")
            elif info.path is not None and not info.path.exists():
                lost.append(f"{when}: the file of pinned row {claim.key.hex()} is gone")

    churn(cache, ns, kind, threads=3, saves=50, sizes=(KB, 150 * KB), after_save=after_save, seed=2)
    assert lost == [] and watch.violations == []
    assert cache.counters().evictions > 0
    for claim in claims:  # the pins are still good to load
        loaded = cache.load(claim, promote=False)
        assert loaded is not None and bytes(loaded) == pinned[claim.key]
        cache.checkin(claim)
    assert cache.check() == []
    assert cache.gc() > 0
    left = [cache.lookup_key(key) for key in pinned]
    assert all(info is None or info.tier != tier for info in left)


@pytest.mark.parametrize("kind", ["ram", "ram_file", "disk"])
def test_a_row_larger_than_its_tier_quota_is_refused_with_payload_too_large(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], kind: str
) -> None:
    # Every tier that small: no slower tier can take the row instead (see test_demotion_chain).
    cache = make_cache(ram=64 * KB, ram_file=64 * KB, disk=64 * KB)
    small = cache.save(ns, [1], payload(10 * KB, 1), tier=kind)
    with pytest.raises(PayloadTooLargeError) as caught:
        cache.save(ns, [2], bytes(64 * KB + 1), tier=kind)
    assert caught.value.quota == 64 * KB and caught.value.tier.startswith(kind)
    assert [r.key for r in cache.rows()] == [small]  # nothing was evicted for it
    assert cache.counters().quota_refusals == 1
    if kind != "ram":
        assert len([p for p in roots[kind].iterdir() if p.name != LOCK_NAME]) == 1
    assert cache.check() == []


@pytest.mark.parametrize("kind", ["ram", "ram_file", "disk"])
def test_a_lone_tier_full_of_pinned_rows_refuses_with_tier_full(
    make_cache: Any, ns: Namespace, kind: str
) -> None:
    alone: dict[str, int | None] = {"ram": None, "ram_file": None, "disk": None}
    cache = make_cache(**{**alone, kind: 100 * KB}, demote_on_evict=False)
    keys = [cache.save(ns, [i], payload(30 * KB, i), tier=kind) for i in range(3)]
    claims = [cache.claim(key) for key in keys]
    with pytest.raises(TierFullError) as caught:
        cache.save(ns, [9], payload(30 * KB, 9), tier=kind)
    assert caught.value.free < 30 * KB
    assert len(cache.rows()) == 3
    cache.checkin(claims[1])  # type: ignore[arg-type]
    cache.save(ns, [9], payload(30 * KB, 9), tier=kind)  # the unpinned row makes room
    assert cache.lookup_key(keys[1]) is None
    assert cache.lookup_key(keys[0]) is not None and cache.lookup_key(keys[2]) is not None
    assert cache.counters().quota_refusals == 1
    for claim in (claims[0], claims[2]):
        cache.checkin(claim)  # type: ignore[arg-type]
    assert cache.check() == []


@pytest.mark.parametrize(("kind", "next_kind"), [("ram", "ram_file"), ("ram_file", "disk")])
def test_a_save_to_a_tier_full_of_pinned_rows_goes_to_the_next_tier_with_room(
    make_cache: Any, ns: Namespace, kind: str, next_kind: str
) -> None:
    cache = make_cache(**{kind: 100 * KB}, demote_on_evict=False)
    keys = [cache.save(ns, [i], payload(30 * KB, i), tier=kind) for i in range(3)]
    claims = [cache.claim(key) for key in keys]
    ticket = cache.save_async(ns, [9], payload(30 * KB, 9), tier=kind)
    assert ticket.result(10).tier == ticket.tier and ticket.tier.startswith(next_kind)
    info = cache.lookup_key(ticket.key)
    assert info is not None and info.tier == ticket.tier
    assert all(cache.lookup_key(key) is not None for key in keys)  # no pinned row went
    counters = cache.counters()
    assert counters.saves_redirected == 1 and counters.saves_dropped == 0
    loaded = cache.load(cache.claim(ticket.key), promote=False)  # type: ignore[arg-type]
    assert loaded is not None and bytes(loaded) == payload(30 * KB, 9)
    for claim in claims:
        cache.checkin(claim)  # type: ignore[arg-type]


def test_ram_byte_gauges_stay_exact_under_concurrent_saves_claims_and_evictions(
    make_cache: Any, ns: Namespace
) -> None:
    cache = make_cache(ram=512 * KB, demote_on_evict=False)
    stop = threading.Event()
    over: list[int] = []

    def claimer() -> None:
        rng = random.Random(5)
        while not stop.is_set():
            rows = cache.rows()
            if rows:
                claim = cache.claim(rng.choice(rows).key)
                if claim is not None:
                    cache.load(claim)
                    cache.checkin(claim)
            if rng.random() < 0.1:
                cache.evict_bytes(rng.randint(1, 100 * KB), ["ram"])
            gauge = cache.counters().bytes_ram
            if gauge > 512 * KB:
                over.append(gauge)

    reader = threading.Thread(target=claimer)
    reader.start()
    try:
        churn(
            cache,
            ns,
            "ram",
            threads=3,
            saves=80,
            sizes=(1, 40 * KB),
            after_save=lambda _: None,
            seed=3,
        )
    finally:
        stop.set()
        reader.join(30)
    assert over == []
    counters = cache.counters()
    rows = cache.rows()
    assert counters.bytes_ram == sum(r.size for r in rows) == cache.shared.ram.total_bytes()
    assert counters.tiers[0].bytes == counters.bytes_ram
    assert cache.check() == []
    cache.gc()
    assert cache.counters().bytes_ram == 0 == cache.shared.ram.total_bytes()


def test_ram_rows_evicted_under_pressure_are_demoted_and_stay_loadable(
    make_cache: Any, ns: Namespace, roots: dict[str, Path]
) -> None:
    cache = make_cache(ram=256 * KB, ram_file=4 * MB, disk=4 * MB, promote_on_hit=False)
    ram_watch = QuotaWatch(cache, "ram", roots)
    file_watch = QuotaWatch(cache, "ram_file", roots)

    def after_save(when: str) -> None:
        ram_watch.check(when)
        file_watch.check(when)

    saved = churn(
        cache,
        ns,
        "ram",
        threads=3,
        saves=30,
        sizes=(4 * KB, 40 * KB),
        after_save=after_save,
        seed=4,
    )
    assert ram_watch.violations == [] and file_watch.violations == []
    counters = cache.counters()
    assert counters.demotions > 0
    assert [t.demotions for t in counters.tiers if t.kind == "ram"] == [counters.demotions]
    kinds = {r.kind for r in cache.rows()}
    assert kinds == {"ram", "ram_file"}
    for info in cache.rows():
        assert cache.fetch(info.key) == saved[info.key]
    # Everything fits in ram + ram_file here, so nothing was lost on the way down.
    assert {r.key for r in cache.rows()} == set(saved)
    assert_index_matches_the_tier(cache, "ram", None)
    assert_index_matches_the_tier(cache, "ram_file", roots["ram_file"])
    assert cache.check() == []


def test_a_demoted_row_too_large_for_the_next_tier_lands_on_the_one_after(
    make_cache: Any, ns: Namespace, wait_until: Any
) -> None:
    cache = make_cache(ram=1 * MB, ram_file=100 * KB, disk=4 * MB, promote_on_hit=False)
    big = payload(600 * KB, 1)
    first = cache.save(ns, [1], big, tier="ram")
    cache.save(ns, [2], payload(600 * KB, 2), tier="ram")  # pushes the first one out of RAM
    wait_until(lambda: cache.lookup_key(first) is not None, "the demoted row to land")
    assert cache.lookup_key(first).kind == "disk"  # type: ignore[union-attr]
    assert cache.fetch(first) == big
    assert cache.counters().demotions == 1 and cache.counters().saves_dropped == 0
    assert cache.check() == []
