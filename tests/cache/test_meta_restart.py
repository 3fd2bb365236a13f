"""Crashes inside ``cache_sup``: the meta actor, a writer and the tier actors come back.

Each test crashes one actor the way a bug would (``exit`` with an abnormal reason, or an
exception raised while it handles a ``tell``), waits for its supervisor to restart it,
and checks that nothing was forgotten and that callers, who address actors by name,
keep working.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pykka
import pytest

from erllama_py.cache import CacheHandle, Namespace, key_hex, kvc
from erllama_py.cache.rootlock import LOCK_NAME
from erllama_py.cache.state import tier_actor_name
from erllama_py.errors import CacheError
from supervisors import ChildInfo, tree, which_children

KB = 1024


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def child(sup: pykka.ActorRef[Any], child_id: str) -> ChildInfo:
    (info,) = [c for c in which_children(sup, timeout=10) if c.id == child_id]
    return info


def crash_by_exit(ref: pykka.ActorRef[Any]) -> None:
    """End the actor with an abnormal reason, as `SupervisedActor.exit` from a bug would."""
    ref.proxy().exit.defer("crashed by the test")


def crash_meta_by_raising_in_a_tell(ref: pykka.ActorRef[Any]) -> None:
    """Make the meta actor raise while handling a tell (an unknown tier)."""
    ref.proxy().evict_bytes.defer(1, ["no-such-tier"])


def wait_restarted(
    sup: pykka.ActorRef[Any], child_id: str, old: pykka.ActorRef[Any], wait_until: Any
) -> pykka.ActorRef[Any]:
    """Wait until `sup` runs a new instance of `child_id`; return it."""

    def restarted() -> bool:
        info = child(sup, child_id)
        return info.state == "running" and info.handle is not None and info.handle is not old

    wait_until(restarted, f"{child_id} to be restarted")
    assert child(sup, child_id).restarts == 1
    handle = child(sup, child_id).handle
    assert isinstance(handle, pykka.ActorRef)
    return handle


def fill(cache: CacheHandle, ns: Namespace) -> dict[bytes, bytes]:
    """A few rows in every tier; returns key -> payload."""
    bodies: dict[bytes, bytes] = {}
    for i, tier in enumerate(["ram", "ram", "ram_file", "disk", "disk", "disk"]):
        body = payload(4 * KB + i, seed=i)
        bodies[cache.save(ns, [i, i + 1, i + 2], body, tier=tier)] = body
    return bodies


def snapshot(cache: CacheHandle) -> set[tuple[bytes, str, int, int]]:
    return {(r.key, r.tier, r.size, r.n_tokens) for r in cache.rows()}


@pytest.mark.parametrize(
    "crash",
    [crash_by_exit, crash_meta_by_raising_in_a_tell],
    ids=["exit", "raise-in-tell"],
)
def test_a_crashed_meta_actor_is_restarted_rescans_and_forgets_nothing(
    make_cache: Any,
    ns: Namespace,
    roots: dict[str, Path],
    wait_until: Any,
    crash: Callable[[pykka.ActorRef[Any]], None],
) -> None:
    cache = make_cache(promote_on_hit=False)
    bodies = fill(cache, ns)
    disk_key = next(k for k in bodies if cache.lookup_key(k).kind == "disk")  # type: ignore[union-attr]
    for _ in range(2):
        assert cache.fetch(disk_key) == bodies[disk_key]
    disk_file = roots["disk"] / f"{key_hex(disk_key)}.kvc"
    wait_until(lambda: kvc.read_prefix_file(disk_file).hit_count == 2, "the hits to reach the file")
    before = snapshot(cache)
    gauges = cache.counters()
    old_index = cache.shared.index()
    sup = cache.shared.registry.lookup("cache_sup")
    meta = cache.shared.registry.lookup("cache_meta")

    crash(meta)

    new_meta = wait_restarted(sup, "cache_meta", meta, wait_until)
    assert cache.shared.registry.lookup("cache_meta") is new_meta
    wait_until(lambda: cache.shared.index() is not old_index, "the new index to be published")
    # Nothing forgotten: RAM rows re-registered, file tiers rescanned, hits read back.
    assert snapshot(cache) == before
    assert cache.lookup_key(disk_key).hits == 2  # type: ignore[union-attr]
    after = cache.counters()
    assert (after.bytes_ram, after.bytes_ramfile, after.bytes_disk) == (
        gauges.bytes_ram,
        gauges.bytes_ramfile,
        gauges.bytes_disk,
    )
    assert after.corrupt_files == 0
    # Callers keep working: the client resolves the meta actor by name.
    for key, body in bodies.items():
        assert cache.fetch(key) == body
    new_key = cache.save(ns, [99], b"after the restart", tier="disk")
    assert cache.fetch(new_key) == b"after the restart"
    assert cache.gc() == len(bodies) + 1
    assert cache.check() == []


def test_a_save_in_flight_when_the_meta_actor_restarts_fails_cleanly(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], wait_until: Any
) -> None:
    cache = make_cache(writers=1)
    entered, gate = threading.Event(), threading.Event()
    owner = threading.get_ident()

    class Gated:
        def view(self) -> memoryview:
            if threading.get_ident() != owner:
                entered.set()
                assert gate.wait(30)
            return memoryview(b"written after the restart")

    ticket = cache.save_async(ns, [1, 2, 3], Gated(), tier="disk")
    assert entered.wait(10)
    sup = cache.shared.registry.lookup("cache_sup")
    meta = cache.shared.registry.lookup("cache_meta")
    crash_by_exit(meta)
    wait_restarted(sup, "cache_meta", meta, wait_until)
    gate.set()
    # The new meta actor never granted this reservation: the writer abandons it.
    with pytest.raises(CacheError):
        ticket.result(10)
    assert cache.rows() == []
    assert [p for p in roots["disk"].iterdir() if p.name != LOCK_NAME] == []
    assert cache.save_async(ns, [1, 2, 3], b"again", tier="disk").result(10).status == "saved"
    assert cache.check() == []


def test_a_claim_from_before_a_meta_restart_cannot_release_a_pin_taken_after_it(
    make_cache: Any, ns: Namespace, wait_until: Any
) -> None:
    cache = make_cache()
    old_key = cache.save(ns, [1], b"claimed before", tier="disk")
    key = cache.save(ns, [2], b"claimed after", tier="disk")
    stale = cache.claim(old_key)
    assert stale is not None
    sup = cache.shared.registry.lookup("cache_sup")
    meta = cache.shared.registry.lookup("cache_meta")
    crash_by_exit(meta)
    wait_restarted(sup, "cache_meta", meta, wait_until)
    pins = [cache.claim(key) for _ in range(stale.holder + 10)]
    assert all(p is not None for p in pins)
    # The reader of the stale claim finishes and checks it in after the restart.
    cache.checkin(stale)
    assert cache.check() == []  # a barrier: the checkin (a tell) has been handled
    assert cache.lookup_key(key).refcount == len(pins)  # type: ignore[union-attr]
    assert cache.gc() == 1  # only the row of the stale claim, now checked in
    assert cache.lookup_key(key) is not None
    for pin in pins:
        cache.checkin(pin)  # type: ignore[arg-type]
    assert cache.gc() == 1
    assert cache.check() == []


def test_a_crashed_writer_is_restarted_and_saves_keep_working(
    make_cache: Any, ns: Namespace, wait_until: Any
) -> None:
    cache = make_cache(writers=2)
    writers = cache.shared.registry.lookup("cache_writers")
    writer = cache.shared.registry.lookup("cache_writer:0")
    assert isinstance(writer, pykka.ActorRef)
    crash_by_exit(writer)
    new_writer = wait_restarted(writers, "cache_writer:0", writer, wait_until)
    wait_until(
        lambda: cache.shared.writer_id_of("cache_writer:0") is not None, "the new writer's id"
    )
    assert cache.shared.registry.lookup("cache_writer:0") is new_writer
    # cache_sup itself did not restart anything: the pool supervisor handled it.
    assert all(c.restarts == 0 for c in which_children(cache.shared.registry.lookup("cache_sup")))
    keys = [cache.save(ns, [i], payload(KB, i), tier="disk") for i in range(8)]
    for i, key in enumerate(keys):
        assert cache.fetch(key) == payload(KB, i)
    assert cache.check() == []


def test_a_crashed_file_tier_actor_is_restarted_and_still_persists_hit_counts(
    make_cache: Any, ns: Namespace, roots: dict[str, Path], wait_until: Any
) -> None:
    cache = make_cache(promote_on_hit=False)
    key = cache.save(ns, [5, 5], b"counted", tier="disk")
    name = tier_actor_name("disk", roots["disk"])
    sup = cache.shared.registry.lookup("cache_sup")
    actor = cache.shared.registry.lookup(name)
    assert isinstance(actor, pykka.ActorRef)
    crash_by_exit(actor)
    new_actor = wait_restarted(sup, name, actor, wait_until)
    for _ in range(3):
        assert cache.fetch(key) == b"counted"
    path = roots["disk"] / f"{key_hex(key)}.kvc"
    wait_until(lambda: kvc.read_prefix_file(path).hit_count == 3, "the hit count in the file")
    assert new_actor.proxy().usage().get(timeout=10) == {"files": 1, "bytes": path.stat().st_size}
    assert cache.check() == []


def test_a_crashed_ram_tier_actor_loses_no_rows(
    make_cache: Any, ns: Namespace, wait_until: Any
) -> None:
    cache = make_cache()
    keys = [cache.save(ns, [i], payload(KB, i), tier="ram") for i in range(4)]
    sup = cache.shared.registry.lookup("cache_sup")
    actor = cache.shared.registry.lookup("cache_ram")
    assert isinstance(actor, pykka.ActorRef)
    crash_by_exit(actor)
    new_actor = wait_restarted(sup, "cache_ram", actor, wait_until)
    assert new_actor.proxy().usage().get(timeout=10) == {"rows": 4, "bytes": 4 * KB}
    for i, key in enumerate(keys):
        assert cache.fetch(key) == payload(KB, i)
    assert cache.check() == []


def test_the_cache_tree_has_the_designed_shape(make_cache: Any, roots: dict[str, Path]) -> None:
    cache = make_cache(writers=3)
    node = tree(cache.shared.registry.lookup("cache_sup"))
    assert node["strategy"] == "one_for_one"
    children = node.get("children", [])
    assert [c["id"] for c in children] == [
        "cache_meta",
        "cache_ram",
        tier_actor_name("ram_file", roots["ram_file"]),
        tier_actor_name("disk", roots["disk"]),
        "cache_writers",
    ]
    assert all(c["state"] == "running" for c in children)
    (pool,) = [c for c in children if c["id"] == "cache_writers"]
    assert pool["kind"] == "supervisor"
    assert [w["id"] for w in pool.get("children", [])] == [f"cache_writer:{i}" for i in range(3)]
