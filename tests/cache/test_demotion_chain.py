"""The whole demotion chain: a row evicted from any tier moves on to the next tier with
room (RAM -> ram_file -> disk), a row too big for its tier is saved in the next one that
can hold it, and both are counted per tier (``demotions`` out, ``demotions_in``).

Demotions run in the writer pool; `wait_idle` waits for them, and one writer keeps
their order (and so which rows end where) the same in every run. Hits are not promoted
here, so that reading a row back does not move the others (a row is absent while it
moves between tiers).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from erllama_py.cache import CacheHandle, Namespace
from erllama_py.cache.counters import TierStats
from erllama_py.kinds import TierKind

KB = 1024
MB = 1024 * KB
ROW = 40 * KB  # two rows (with their file headers) fit a 100 KB tier, three do not


def body(i: int, size: int = ROW) -> bytes:
    return random.Random(i).randbytes(size)


def stats(cache: CacheHandle) -> dict[TierKind, TierStats]:
    return {t.kind: t for t in cache.counters().tiers}


def test_rows_evicted_from_ram_and_then_from_ram_file_end_on_disk_intact(
    make_cache: Any, ns: Namespace
) -> None:
    cache = make_cache(
        ram=100 * KB, ram_file=100 * KB, disk=1 * MB, writers=1, promote_on_hit=False
    )
    keys = [cache.save(ns, [i, 1], body(i), tier="ram") for i in range(8)]
    cache.wait_idle(30)
    where = {key: cache.lookup_key(key) for key in keys}
    assert all(info is not None for info in where.values()), "a demoted row was lost"
    tiers = stats(cache)
    assert (tiers["ram"].rows, tiers["ram_file"].rows, tiers["disk"].rows) == (2, 2, 4)
    # The newest rows stay in the fastest tier; the oldest went all the way down.
    kinds = [where[k].kind for k in keys]  # type: ignore[union-attr]
    assert kinds == ["disk"] * 4 + ["ram_file"] * 2 + ["ram"] * 2
    assert (tiers["ram"].demotions, tiers["ram_file"].demotions_in) == (6, 6)
    assert (tiers["ram_file"].demotions, tiers["disk"].demotions_in) == (4, 4)
    counters = cache.counters()
    assert counters.demotions == 10 and counters.saves_dropped == 0
    for i, key in enumerate(keys):
        assert cache.fetch(key) == body(i)  # checksum and key verified on the way
    assert cache.check() == []  # no file left behind in ram_file for a row that moved on


def test_a_row_too_big_for_its_tier_is_saved_in_the_next_tier_that_can_hold_it(
    make_cache: Any, ns: Namespace
) -> None:
    cache = make_cache(ram=64 * KB, ram_file=128 * KB, disk=1 * MB, promote_on_hit=False)
    medium = cache.save(ns, [1], body(1, 100 * KB), tier="ram")
    large = cache.save(ns, [2], body(2, 200 * KB), tier="ram")
    cache.wait_idle(30)
    assert cache.lookup_key(medium).kind == "ram_file"  # type: ignore[union-attr]
    assert cache.lookup_key(large).kind == "disk"  # type: ignore[union-attr]
    assert cache.fetch(medium) == body(1, 100 * KB) and cache.fetch(large) == body(2, 200 * KB)
    counters = cache.counters()
    assert counters.saves_redirected == 2 and counters.quota_refusals == 0
    assert counters.saves_dropped == 0
    assert cache.check() == []


def test_a_file_row_corrupted_before_its_demotion_is_dropped_not_moved(
    make_cache: Any, ns: Namespace, roots: dict[str, Path]
) -> None:
    cache = make_cache(ram=None, ram_file=100 * KB, disk=1 * MB, writers=1)
    first = cache.save(ns, [1], body(1), tier="ram_file")
    path = roots["ram_file"] / f"{first.hex()}.kvc"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the payload's last byte
    path.write_bytes(bytes(data))
    for i in (2, 3):  # the second one evicts the first
        cache.save(ns, [i], body(i), tier="ram_file")
    cache.wait_idle(30)
    assert cache.lookup_key(first) is None
    counters = cache.counters()
    assert counters.corrupt_files == 1 and stats(cache)["disk"].demotions_in == 0
    assert cache.check() == []


def test_without_demotion_an_evicted_file_row_is_dropped(make_cache: Any, ns: Namespace) -> None:
    cache = make_cache(ram=None, ram_file=100 * KB, disk=1 * MB, demote_on_evict=False)
    first = cache.save(ns, [1], body(1), tier="ram_file")
    for i in (2, 3):
        cache.save(ns, [i], body(i), tier="ram_file")
    cache.wait_idle(30)
    assert cache.lookup_key(first) is None
    assert stats(cache)["disk"].rows == 0 and cache.counters().demotions == 0
