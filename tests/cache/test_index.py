"""The cache index (the meta actor's state): the original's meta_srv tests (spec 6.4),
ported, plus quotas, demotion, waiters and the token trie."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest

from erllama_py.cache.actions import Adopt, Demote, Drop, RemoveTemp
from erllama_py.cache.index import CacheIndex
from erllama_py.cache.key import Namespace, encode_tokens, make_key
from erllama_py.cache.rows import Announcement, ReserveRequest, Row, RowInfo
from erllama_py.config import TierSettings
from erllama_py.errors import (
    PayloadTooLargeError,
    ReservationError,
    TierFullError,
    UnknownTierError,
)

NS = Namespace(fingerprint=b"\x01" * 32, quant="q4_k_m", ctx_hash=b"\x02" * 16)
OTHER_NS = Namespace(fingerprint=b"\x03" * 32, quant="q4_k_m", ctx_hash=b"\x02" * 16)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_index(
    ram: int = 1000, disk: int = 10_000, *, demote: bool = True, alive: bool = True
) -> tuple[CacheIndex, FakeClock]:
    clock = FakeClock()
    tiers = [
        TierSettings("ram", ram),
        TierSettings("disk", disk, Path("/nonexistent/disk")),
    ]
    index = CacheIndex(
        tiers,
        demote_on_evict=demote,
        reservation_ttl_s=60.0,
        clock=clock,
        writer_alive=lambda _w: alive,
    )
    return index, clock


def row(tokens: list[int], tier: str = "ram", size: int = 100, ns: Namespace = NS) -> Row:
    return Row(
        key=make_key(ns, tokens),
        tier=tier,
        kind=tier.split(":", maxsplit=1)[0],
        namespace=ns,
        tokens=encode_tokens(tokens),
        size=size,
        reason="finish",
        created_ns=0,
        path=Path(f"/nonexistent/{tier}/{tokens}") if tier != "ram" else None,
    )


def save(index: CacheIndex, tokens: list[int], tier: str = "disk", size: int = 100) -> RowInfo:
    key = make_key(NS, tokens)
    res, _ = index.reserve(
        ReserveRequest(
            key,
            tier,
            namespace=NS,
            tokens=encode_tokens(tokens),
            size=size,
            reason="cold",
            writer="w1",
        )
    )
    info, _ = index.announce(
        Announcement(key, res.tier, res.token, size=size, path=Path(f"/d/{key.hex()}"))
    )
    return info


def test_lookup_exact_misses_an_empty_index() -> None:
    index, _ = make_index()
    assert index.lookup_exact(make_key(NS, [1, 2])) is None


def test_insert_available_makes_lookup_hit() -> None:
    index, _ = make_index()
    r = row([1, 2, 3])
    index.insert_available(r)
    info = index.lookup_exact(r.key)
    assert info is not None
    assert (info.tier, info.status, info.refcount, info.n_tokens) == ("ram", "available", 0, 3)
    assert index.check() == []


def test_claim_increments_refcount_and_checkin_releases_it() -> None:
    index, _ = make_index()
    r = row([1, 2, 3])
    index.insert_available(r)
    claim = index.claim(r.key)
    assert claim is not None
    assert index.row(r.key, "ram").refcount == 1  # type: ignore[union-attr]
    index.checkin(claim.holder)
    assert index.row(r.key, "ram").refcount == 0  # type: ignore[union-attr]
    assert index.check() == []


def test_claim_misses_an_unknown_key() -> None:
    index, _ = make_index()
    assert index.claim(make_key(NS, [9])) is None


def test_claim_bumps_the_hit_counter() -> None:
    index, _ = make_index()
    r = row([1])
    index.insert_available(r)
    for _ in range(2):
        claim = index.claim(r.key)
        assert claim is not None
        index.checkin(claim.holder)
    assert index.lookup_exact(r.key).hits == 2  # type: ignore[union-attr]


def test_two_holders_have_independent_pins() -> None:
    index, _ = make_index()
    r = row([1])
    index.insert_available(r)
    a, b = index.claim(r.key), index.claim(r.key)
    assert a and b and a.holder != b.holder
    index.checkin(a.holder)
    assert index.row(r.key, "ram").refcount == 1  # type: ignore[union-attr]


def test_checkin_of_an_unknown_holder_is_a_noop() -> None:
    index, _ = make_index()
    index.checkin(12345)
    assert index.check() == []


def test_scanned_rows_with_more_hits_are_evicted_last() -> None:
    index, clock = make_index(ram=250, demote=False)
    popular, plain = row([1]), row([2])
    popular.hits = 7
    index.insert_scanned([popular, plain])
    assert index.row(popular.key, "ram").last_used == clock.now + 7  # type: ignore[union-attr]
    [action] = index.insert_available(row([3]))
    assert isinstance(action, Drop) and action.row.key == plain.key
    assert [a.row.key for a in index.evict_bytes(1, ["ram"]) if isinstance(a, Drop)] == [
        make_key(NS, [3])
    ]


def test_claim_prefers_the_fastest_copy() -> None:
    index, _ = make_index()
    index.insert_available(row([1], "disk:/nonexistent/disk"))
    index.insert_available(row([1], "ram"))
    claim = index.claim(make_key(NS, [1]))
    assert claim is not None and claim.tier == "ram"
    claim = index.claim(make_key(NS, [1]), "disk")
    assert claim is not None and claim.tier == "disk:/nonexistent/disk"


def test_reserve_creates_a_writing_row() -> None:
    index, _ = make_index()
    key = make_key(NS, [5])
    index.reserve(
        ReserveRequest(
            key, "disk", namespace=NS, tokens=encode_tokens([5]), size=10, reason="cold", writer="w"
        )
    )
    [info] = index.rows()
    assert info.status == "writing"
    assert index.pending(key)
    assert index.lookup_exact(key) is None
    assert index.used_bytes("disk:/nonexistent/disk") == 10


def test_reserve_rejects_an_already_present_row() -> None:
    index, _ = make_index()
    save(index, [5])
    with pytest.raises(ReservationError) as info:
        save(index, [5])
    assert info.value.reason == "already_present"


def test_reserve_rejects_a_concurrent_live_writer() -> None:
    index, _ = make_index()
    key = make_key(NS, [5])
    kwargs = {"namespace": NS, "tokens": encode_tokens([5]), "size": 10, "reason": "cold"}
    index.reserve(ReserveRequest(key, "disk", writer="a", **kwargs))  # type: ignore[arg-type]
    with pytest.raises(ReservationError) as info:
        index.reserve(ReserveRequest(key, "disk", writer="b", **kwargs))  # type: ignore[arg-type]
    assert info.value.reason == "conflict"


def test_a_stale_reservation_is_cleaned_and_replaced() -> None:
    index, clock = make_index()
    key = make_key(NS, [5])
    kwargs = {"namespace": NS, "tokens": encode_tokens([5]), "size": 10, "reason": "cold"}
    old, _ = index.reserve(ReserveRequest(key, "disk", writer="a", **kwargs))  # type: ignore[arg-type]
    clock.now += 61
    new, actions = index.reserve(ReserveRequest(key, "disk", writer="b", **kwargs))  # type: ignore[arg-type]
    assert new.token != old.token
    assert any(isinstance(a, Adopt) for a in actions)
    with pytest.raises(ReservationError):
        index.check_reservation(key, old.tier, old.token)
    assert index.used_bytes(new.tier) == 10
    assert index.check() == []


def test_check_reservation_refreshes_the_ttl() -> None:
    index, clock = make_index()
    key = make_key(NS, [5])
    res, _ = index.reserve(
        ReserveRequest(
            key, "disk", namespace=NS, tokens=encode_tokens([5]), size=10, reason="cold", writer="w"
        )
    )
    clock.now += 50
    index.check_reservation(key, res.tier, res.token)
    clock.now += 50
    assert index.expire_stale() == []


def test_check_reservation_with_an_unknown_token_is_expired() -> None:
    index, _ = make_index()
    with pytest.raises(ReservationError) as info:
        index.check_reservation(make_key(NS, [5]), "disk:/nonexistent/disk", 99)
    assert info.value.reason == "expired"


def test_announce_promotes_the_reservation_to_an_available_row() -> None:
    index, _ = make_index()
    info = save(index, [5], size=40)
    assert info.status == "available"
    assert index.lookup_exact(info.key) == info
    assert not index.pending(info.key)
    assert index.used_bytes(info.tier) == 40
    assert index.check() == []


def test_cancel_clears_the_reservation_and_its_bytes() -> None:
    index, _ = make_index()
    key = make_key(NS, [5])
    res, _ = index.reserve(
        ReserveRequest(
            key, "disk", namespace=NS, tokens=encode_tokens([5]), size=10, reason="cold", writer="w"
        )
    )
    index.cancel(key, res.tier, res.token + 1)  # wrong token: no-op
    assert index.pending(key)
    index.cancel(key, res.tier, res.token)
    assert index.rows() == []
    assert index.used_bytes(res.tier) == 0


def test_writer_death_before_link_removes_the_temp_and_looks_for_a_final_file() -> None:
    index, _ = make_index()
    key = make_key(NS, [5])
    res, _ = index.reserve(
        ReserveRequest(
            key, "disk", namespace=NS, tokens=encode_tokens([5]), size=10, reason="cold", writer="w"
        )
    )
    index.set_temp_path(key, res.tier, res.token, Path("/d/x.tmp"))
    actions = index.writer_down("w")
    assert RemoveTemp(Path("/d/x.tmp")) in actions
    assert any(isinstance(a, Adopt) for a in actions)
    assert index.rows() == []


def test_writer_death_after_link_asks_for_adoption() -> None:
    index, _ = make_index()
    key = make_key(NS, [5])
    res, _ = index.reserve(
        ReserveRequest(
            key, "disk", namespace=NS, tokens=encode_tokens([5]), size=10, reason="cold", writer="w"
        )
    )
    index.mark_published(key, res.tier, res.token, Path("/d/final.kvc"))
    [action] = index.writer_down("w")
    assert isinstance(action, Adopt)
    assert action.reservation.stage == "post_link"
    assert action.reservation.path == Path("/d/final.kvc")


def test_a_dead_writers_reservation_is_not_live() -> None:
    index, _ = make_index(alive=False)
    key = make_key(NS, [5])
    index.reserve(
        ReserveRequest(
            key, "disk", namespace=NS, tokens=encode_tokens([5]), size=10, reason="cold", writer="w"
        )
    )
    assert len(index.expire_stale()) == 1
    assert index.rows() == []


def test_wait_returns_immediately_on_an_available_row() -> None:
    index, _ = make_index()
    info = save(index, [5])
    future: Future[RowInfo | None] = Future()
    index.add_waiter(info.key, future)
    assert future.result(0) == info


def test_wait_returns_a_miss_immediately_when_nothing_is_in_flight() -> None:
    index, _ = make_index()
    future: Future[RowInfo | None] = Future()
    index.add_waiter(make_key(NS, [5]), future)
    assert future.result(0) is None


def test_a_parked_waiter_gets_the_row_when_the_save_publishes() -> None:
    index, _ = make_index()
    key = make_key(NS, [5])
    res, _ = index.reserve(
        ReserveRequest(
            key, "disk", namespace=NS, tokens=encode_tokens([5]), size=10, reason="cold", writer="w"
        )
    )
    future: Future[RowInfo | None] = Future()
    index.add_waiter(key, future)
    assert not future.done()
    info, _ = index.announce(Announcement(key, res.tier, res.token, size=10))
    assert future.result(0) == info


def test_a_parked_waiter_gets_a_miss_when_the_save_is_cancelled() -> None:
    index, _ = make_index()
    key = make_key(NS, [5])
    res, _ = index.reserve(
        ReserveRequest(
            key, "disk", namespace=NS, tokens=encode_tokens([5]), size=10, reason="cold", writer="w"
        )
    )
    future: Future[RowInfo | None] = Future()
    index.add_waiter(key, future)
    index.cancel(key, res.tier, res.token)
    assert future.result(0) is None


def test_gc_evicts_unreferenced_rows_only() -> None:
    index, _ = make_index()
    a, b = row([1]), row([2])
    index.insert_available(a)
    index.insert_available(b)
    claim = index.claim(b.key)
    assert claim is not None
    actions = index.gc()
    assert [x.row.key for x in actions if isinstance(x, Drop)] == [a.key]
    assert index.lookup_exact(b.key) is not None
    assert index.check() == []


def test_gc_skips_rows_being_written() -> None:
    index, _ = make_index()
    key = make_key(NS, [5])
    index.reserve(
        ReserveRequest(
            key, "disk", namespace=NS, tokens=encode_tokens([5]), size=10, reason="cold", writer="w"
        )
    )
    assert index.gc() == []
    assert index.pending(key)


def test_evict_bytes_zero_is_a_noop() -> None:
    index, _ = make_index()
    index.insert_available(row([1]))
    assert index.evict_bytes(0) == []


def test_evict_bytes_evicts_oldest_first_across_tiers_until_enough() -> None:
    index, clock = make_index()
    rows = [row([1]), row([2], "disk:/nonexistent/disk"), row([3])]
    for r in rows:
        index.insert_available(r)
        clock.now += 1
    actions = index.evict_bytes(150, ["ram", "disk"])
    assert [a.row.key for a in actions if isinstance(a, Drop | Demote)] == [
        rows[0].key,
        rows[1].key,
    ]


def test_reserve_evicts_least_recently_used_rows_to_stay_under_quota() -> None:
    index, clock = make_index(ram=1000, disk=300, demote=False)
    infos = []
    for i in range(3):
        infos.append(save(index, [i], size=100))
        clock.now += 1
    claim = index.claim(infos[0].key)  # pins the oldest and makes it recent
    assert claim is not None
    index.checkin(claim.holder)
    key = make_key(NS, [9])
    _, actions = index.reserve(
        ReserveRequest(
            key,
            "disk",
            namespace=NS,
            tokens=encode_tokens([9]),
            size=100,
            reason="cold",
            writer="w",
        )
    )
    assert [a.row.key for a in actions if isinstance(a, Drop)] == [infos[1].key]
    assert index.used_bytes("disk:/nonexistent/disk") == 300
    assert index.check() == []


def test_reserve_never_evicts_a_pinned_row() -> None:
    index, _ = make_index(disk=200, demote=False)
    a = save(index, [1], size=100)
    b = save(index, [2], size=100)
    index.claim(a.key)
    index.claim(b.key)
    with pytest.raises(TierFullError):
        save(index, [3], size=100)
    assert index.lookup_exact(a.key) and index.lookup_exact(b.key)
    assert index.check() == []


def test_a_row_larger_than_the_quota_is_refused() -> None:
    index, _ = make_index(disk=200)
    with pytest.raises(PayloadTooLargeError) as info:
        save(index, [1], size=201)
    assert info.value.quota == 200


def test_an_unknown_tier_is_refused() -> None:
    index, _ = make_index()
    with pytest.raises(UnknownTierError):
        save(index, [1], tier="ram_file")


def test_eviction_from_ram_demotes_to_the_next_tier() -> None:
    index, _ = make_index(ram=150)
    first = row([1], size=100)
    index.insert_available(first)
    actions = index.insert_available(row([2], size=100))
    [demote] = actions
    assert isinstance(demote, Demote)
    assert demote.row.key == first.key
    assert demote.targets == ("disk:/nonexistent/disk",)
    assert index.lookup_exact(first.key) is None
    assert index.check() == []


def test_insert_past_quota_with_only_pinned_rows_drops_the_newcomer() -> None:
    index, _ = make_index(ram=150, demote=False)
    pinned = row([1], size=100)
    index.insert_available(pinned)
    index.claim(pinned.key)
    newcomer = row([2], size=100)
    [action] = index.insert_available(newcomer)
    assert isinstance(action, Drop) and action.row.key == newcomer.key
    assert index.lookup_exact(pinned.key) is not None
    assert index.check() == []


def test_remove_drops_a_corrupt_row_even_when_pinned() -> None:
    index, _ = make_index()
    r = row([1])
    index.insert_available(r)
    claim = index.claim(r.key)
    assert claim is not None
    [action] = index.remove(r.key, "ram")
    assert isinstance(action, Drop)
    assert index.lookup_exact(r.key) is None
    index.checkin(claim.holder)
    assert index.check() == []


def test_longest_prefix_finds_covering_and_common_rows() -> None:
    index, _ = make_index()
    short, long_ = row([1, 2, 3]), row([1, 2, 3, 4, 5, 6])
    index.insert_available(short)
    index.insert_available(long_)
    hit = index.longest_prefix(NS, encode_tokens([1, 2, 3, 4, 9]))
    assert hit is not None
    assert hit.covered is not None and hit.covered.key == short.key
    assert hit.common is not None and hit.common.key == long_.key
    assert hit.common_len == 4


def test_longest_prefix_is_scoped_to_the_namespace() -> None:
    index, _ = make_index()
    index.insert_available(row([1, 2, 3], ns=OTHER_NS))
    assert index.longest_prefix(NS, encode_tokens([1, 2, 3])) is None


def test_a_key_leaves_the_trie_with_its_last_copy() -> None:
    index, _ = make_index()
    index.insert_available(row([1, 2], "ram"))
    index.insert_available(row([1, 2], "disk:/nonexistent/disk"))
    key = make_key(NS, [1, 2])
    index.remove(key, "ram")
    assert index.longest_prefix(NS, encode_tokens([1, 2])) is not None
    index.remove(key, "disk:/nonexistent/disk")
    assert index.longest_prefix(NS, encode_tokens([1, 2])) is None
    assert index.check() == []
