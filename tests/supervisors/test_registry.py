"""Names that survive restarts (supervisors/_registry.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pykka
import pytest
from sup_helpers import WAIT, Crash, Worker, actor, wait_rebound, wait_until, worker_spec

from supervisors import (
    AlreadyRegisteredError,
    ChildSpec,
    NoProcError,
    Registry,
    Supervisor,
    get_registry,
    start_child,
)


def test_unbound_name_is_absent() -> None:
    registry = Registry()
    assert registry.whereis("nobody") is None
    assert registry.names() == []
    with pytest.raises(NoProcError, match="'nobody'"):
        registry.lookup("nobody")


def test_bound_name_resolves_to_the_live_instance() -> None:
    registry = Registry()
    ref = Worker.start()
    registry.bind("w", ref)
    assert registry.whereis("w") is ref
    assert registry.lookup("w") is ref
    assert registry.wait_for("w", timeout=0) is ref
    assert registry.names() == ["w"]


def test_name_bound_to_a_dead_instance_is_absent_and_can_be_rebound() -> None:
    registry = Registry()
    dead = Worker.start()
    registry.bind("w", dead)
    dead.stop()
    assert registry.whereis("w") is None
    assert registry.names() == []
    alive = Worker.start()
    registry.bind("w", alive)
    assert registry.lookup("w") is alive


def test_binding_a_name_held_by_another_live_instance_is_refused() -> None:
    registry = Registry()
    registry.bind("w", Worker.start())
    with pytest.raises(AlreadyRegisteredError, match="'w'"):
        registry.bind("w", Worker.start())


def test_unbind_leaves_a_name_rebound_to_another_instance_alone() -> None:
    registry = Registry()
    old, new = Worker.start(), Worker.start()
    registry.bind("w", old)
    old.stop()
    registry.bind("w", new)
    assert not registry.unbind("w", old)
    assert registry.lookup("w") is new
    assert registry.unbind("w")
    assert registry.whereis("w") is None


def test_wait_for_times_out_with_no_proc() -> None:
    with pytest.raises(NoProcError, match=r"within 0\.05 s"):
        Registry().wait_for("never", timeout=0.05)


def test_registry_returns_the_new_instance_after_a_restart() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("db", name="db")])
    registry = get_registry(sup)
    first = actor(registry.lookup("db"))
    first.tell(Crash())
    second = actor(wait_rebound(registry, "db", first))
    assert registry.lookup("db") is second
    assert second.ask("anything", timeout=WAIT) is None


def test_wait_for_blocks_across_a_restart() -> None:
    gate = threading.Event()
    starts: list[int] = []

    def start() -> Any:
        starts.append(len(starts))
        if len(starts) > 1:
            assert gate.wait(WAIT)  # hold the restart until the waiter is blocked
        return Worker.start()

    sup = Supervisor.start("sup", children=[ChildSpec("db", start, name="db")])
    registry = get_registry(sup)
    first = actor(registry.lookup("db"))
    first.tell(Crash())
    wait_until(lambda: len(starts) == 2)  # the restart has begun; the name is unbound
    assert registry.whereis("db") is None

    found: Future[Any] = Future()
    waiter = threading.Thread(target=lambda: found.set_result(registry.wait_for("db", WAIT)))
    waiter.start()
    waiter.join(0.05)
    assert not found.done()
    gate.set()
    second = found.result(timeout=WAIT)
    assert second is not first
    assert second.is_alive()


def test_supervisor_binds_its_own_name() -> None:
    sup = Supervisor.start("root")
    assert get_registry(sup).lookup("root") is sup


def test_nested_supervisors_share_the_registry_of_their_root() -> None:
    def middle() -> Any:
        return Supervisor.start("mid", children=[worker_spec("leaf", name="leaf")])

    registry = Registry()
    sup = Supervisor.start(
        "root", children=[ChildSpec("mid", middle, kind="supervisor")], registry=registry
    )
    assert get_registry(sup) is registry
    assert registry.names() == ["leaf", "mid", "root"]
    assert get_registry(actor(registry.lookup("mid"))) is registry


def test_separate_trees_have_separate_registries() -> None:
    one = Supervisor.start("same", children=[worker_spec("w", name="w")])
    two = Supervisor.start("same", children=[worker_spec("w", name="w")])
    assert get_registry(one) is not get_registry(two)


def test_child_whose_name_is_taken_fails_to_start_and_is_stopped(
    new_actors: Callable[[], list[pykka.ActorRef[Any]]],
) -> None:
    registry = Registry()
    squatter = Worker.start()
    registry.bind("w", squatter)
    sup = Supervisor.start("sup", registry=registry)
    with pytest.raises(AlreadyRegisteredError):
        start_child(sup, worker_spec("w", name="w"), timeout=WAIT)
    # Only the squatter and the supervisor are left.
    wait_until(lambda: len(new_actors()) == 2)
    assert registry.lookup("w") is squatter
