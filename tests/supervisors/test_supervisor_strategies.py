"""Restart strategies, restart types, intensity, escalation and the child API (_supervisor.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, cast

import pykka
import pytest
from pykka.messages import ProxyCall
from sup_helpers import (
    WAIT,
    Crash,
    Exit,
    FakeClock,
    StopSelf,
    Worker,
    actor,
    child,
    handle_of,
    reports,
    wait_exit_processed,
    wait_rebound,
    wait_until,
    worker_spec,
)

from supervisors import (
    ChildNotFoundError,
    ChildSpec,
    ChildStateError,
    Supervisor,
    SupervisorConfigError,
    SupervisorError,
    count_children,
    delete_child,
    get_registry,
    restart_child,
    start_child,
    terminate_child,
    which_children,
)
from supervisors._supervisor import _ChildExit

EXITS: dict[str, Any] = {
    "normal": StopSelf(),
    "shutdown": Exit("shutdown"),
    "abnormal": Crash(),
}
STRATEGIES = ["one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one"]
GROUP = {
    "one_for_one": {1},
    "simple_one_for_one": {1},
    "one_for_all": {0, 1, 2},
    "rest_for_one": {1, 2},
}


def _start_three(strategy: str, restart: Any) -> tuple[pykka.ActorRef[Any], list[str]]:
    if strategy == "simple_one_for_one":
        template = ChildSpec("w", Worker.start, restart=restart)
        sup = Supervisor.start("sup", strategy=strategy, children=[template])
        for label in "abc":
            start_child(sup, label, timeout=WAIT)
        return sup, [c.id for c in which_children(sup)]
    specs = [worker_spec("a"), worker_spec("b", restart=restart), worker_spec("c")]
    return Supervisor.start("sup", strategy=strategy, children=specs), ["a", "b", "c"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    ("restart", "exit_kind"),
    [
        pytest.param(restart, exit_kind, id=f"{restart}-{exit_kind}")
        for restart in ("permanent", "transient", "temporary")
        for exit_kind in EXITS
    ],
)
def test_exit_of_the_middle_child_restarts_what_the_strategy_and_restart_type_say(
    strategy: str, restart: str, exit_kind: str
) -> None:
    # Tests what happens when the second of three children exits: which instances are
    # replaced (new refs), which are left alone, and what becomes of the one that exited.
    sup, ids = _start_three(strategy, restart)
    before: dict[str, Any] = {c.id: c.handle for c in which_children(sup)}
    target = ids[1]

    before[target].tell(EXITS[exit_kind])
    wait_exit_processed(sup, target, before[target])

    after = {c.id: c for c in which_children(sup)}
    abnormal = exit_kind == "abnormal"
    if restart == "permanent" or (restart == "transient" and abnormal):
        for index, child_id in enumerate(ids):
            info = after[child_id]
            assert info.state == "running"
            replaced = info.handle is not before[child_id]
            assert replaced == (index in GROUP[strategy]), child_id
            assert info.restarts == (1 if replaced else 0)
        last_exit = after[target].last_exit
        if abnormal:
            assert isinstance(last_exit, RuntimeError)
        else:
            assert last_exit == exit_kind  # "normal" or "shutdown"
        return
    # Not restarted: the siblings are untouched.
    for child_id in ids:
        if child_id != target:
            assert after[child_id].handle is before[child_id]
    if restart == "temporary" or strategy == "simple_one_for_one":
        assert target not in after
    else:
        assert after[target].state == "terminated"
        assert after[target].handle is None


def test_children_start_in_order_and_stop_in_reverse_order() -> None:
    events: list[str] = []

    def spec(child_id: str) -> ChildSpec:
        def start() -> Any:
            events.append(f"start {child_id}")
            return Worker.start(child_id, events)

        return ChildSpec(child_id, start)

    sup = Supervisor.start("sup", children=[spec("a"), spec("b"), spec("c")])
    assert [c.id for c in which_children(sup)] == ["a", "b", "c"]
    sup.stop()
    assert events == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


def test_child_start_failure_fails_the_supervisor_start_and_leaves_nothing_running(
    new_actors: Callable[[], list[Any]],
) -> None:
    events: list[str] = []
    started: list[pykka.ActorRef[Any]] = []
    registry_error = RuntimeError("b cannot start")

    def start_a() -> Any:
        ref = Worker.start("a", events)
        started.append(ref)
        return ref

    def start_b() -> Any:
        raise registry_error

    def start_c() -> Any:
        events.append("start c")
        return Worker.start("c", events)

    from supervisors import Registry

    registry = Registry()
    with pytest.raises(RuntimeError) as raised:
        Supervisor.start(
            "sup",
            children=[
                ChildSpec("a", start_a, name="a"),
                ChildSpec("b", start_b),
                ChildSpec("c", start_c),
            ],
            registry=registry,
        )
    assert raised.value is registry_error
    assert events == ["stop a"]
    assert not started[0].is_alive()
    assert new_actors() == []
    assert registry.names() == []


def test_start_that_returns_no_actor_or_process_fails_with_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"expected a pykka\.ActorRef or a ProcessChild"):
        Supervisor.start("sup", children=[ChildSpec("a", lambda: cast(Any, 42))])


def test_start_error_is_reported_with_the_offender(caplog: pytest.LogCaptureFixture) -> None:
    def start() -> Any:
        msg = "no"
        raise OSError(msg)

    with caplog.at_level(logging.ERROR, logger="supervisors"), pytest.raises(OSError):
        Supervisor.start("sup", children=[ChildSpec("a", start, restart="transient")])
    (fields,) = reports(caplog.records)
    assert fields["supervisor"] == "sup"
    assert fields["context"] == "start_error"
    assert fields["reason"] == "OSError: no"
    assert fields["offender"]["id"] == "a"
    assert fields["offender"]["restart"] == "transient"


def test_start_child_appends_and_starts_a_child() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("a")])
    handle = start_child(sup, worker_spec("b"), timeout=WAIT)
    assert actor(handle).is_alive()
    assert [c.id for c in which_children(sup)] == ["a", "b"]


def test_start_child_with_a_present_id_is_refused() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("a")])
    with pytest.raises(ChildStateError, match="already present"):
        start_child(sup, worker_spec("a"), timeout=WAIT)


def test_start_child_with_an_invalid_spec_names_the_field() -> None:
    sup = Supervisor.start("sup")
    with pytest.raises(SupervisorConfigError) as raised:
        start_child(sup, worker_spec("a", restart="often"), timeout=WAIT)
    assert raised.value.key == "spec.restart"
    assert which_children(sup) == []


def test_start_child_whose_start_raises_is_not_added() -> None:
    sup = Supervisor.start("sup")

    def start() -> Any:
        msg = "nope"
        raise ValueError(msg)

    with pytest.raises(ValueError, match="nope"):
        start_child(sup, ChildSpec("a", start), timeout=WAIT)
    assert which_children(sup) == []


def test_terminated_child_keeps_its_spec_and_can_be_restarted() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("a")])
    first = handle_of(sup, "a")
    terminate_child(sup, "a", timeout=WAIT)
    assert not first.is_alive()
    info = child(sup, "a")
    assert info is not None
    assert (info.state, info.handle) == ("terminated", None)
    second = restart_child(sup, "a", timeout=WAIT)
    assert second is not first
    assert actor(second).is_alive()


def test_restart_and_delete_of_a_running_child_are_refused() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("a")])
    with pytest.raises(ChildStateError, match="running"):
        restart_child(sup, "a", timeout=WAIT)
    with pytest.raises(ChildStateError, match="running"):
        delete_child(sup, "a", timeout=WAIT)


def test_deleted_child_is_forgotten() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("a"), worker_spec("b")])
    terminate_child(sup, "a", timeout=WAIT)
    delete_child(sup, "a", timeout=WAIT)
    assert [c.id for c in which_children(sup)] == ["b"]
    with pytest.raises(ChildNotFoundError):
        restart_child(sup, "a", timeout=WAIT)


def test_operations_on_an_unknown_child_raise_not_found() -> None:
    sup = Supervisor.start("sup")
    for operation in (terminate_child, restart_child, delete_child):
        with pytest.raises(ChildNotFoundError):
            operation(sup, "ghost", timeout=WAIT)


def test_terminated_temporary_child_is_removed() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("t", restart="temporary")])
    terminate_child(sup, "t", timeout=WAIT)
    assert which_children(sup) == []


def test_simple_one_for_one_starts_dynamic_children_with_the_given_arguments() -> None:
    labels: list[str] = []

    def start(label: str) -> Any:
        labels.append(label)
        return Worker.start(label)

    sup = Supervisor.start(
        "pool", strategy="simple_one_for_one", children=[ChildSpec("worker", start)]
    )
    assert which_children(sup) == []
    first = actor(start_child(sup, "x", timeout=WAIT))
    start_child(sup, "y", timeout=WAIT)
    assert [c.id for c in which_children(sup)] == ["worker-1", "worker-2"]
    assert labels == ["x", "y"]

    first.tell(Crash())
    wait_exit_processed(sup, "worker-1", first)
    # Restarted with the same arguments, under the same id.
    assert labels == ["x", "y", "x"]
    assert handle_of(sup, "worker-1") is not first

    terminate_child(sup, handle_of(sup, "worker-2"), timeout=WAIT)
    assert [c.id for c in which_children(sup)] == ["worker-1"]
    assert count_children(sup).specs == 1


def test_simple_one_for_one_refuses_restart_and_delete_child() -> None:
    sup = Supervisor.start(
        "pool", strategy="simple_one_for_one", children=[worker_spec("w", restart="transient")]
    )
    with pytest.raises(SupervisorError, match="simple_one_for_one"):
        restart_child(sup, "w-1", timeout=WAIT)
    with pytest.raises(SupervisorError, match="simple_one_for_one"):
        delete_child(sup, "w-1", timeout=WAIT)


def test_supervisor_gives_up_after_more_than_intensity_restarts_within_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    sup = Supervisor.start(
        "sup",
        intensity=2,
        period=60.0,
        children=[worker_spec("a", events), worker_spec("b", events)],
    )
    with caplog.at_level(logging.ERROR, logger="supervisors"):
        for _ in range(3):
            victim = handle_of(sup, "a")
            victim.tell(Crash())
            wait_exit_processed(sup, "a", victim)
        sup.actor_stopped.wait(WAIT)
    assert not sup.is_alive()
    supervisor = sup._actor_weakref()
    if supervisor is not None:
        assert supervisor.exit_reason == "reached_max_restart_intensity"
    # b was still running and is stopped on the way out.
    assert events[-1] == "stop b"
    fields = reports(caplog.records)
    assert [f["context"] for f in fields] == ["child_terminated"] * 3 + ["shutdown"]
    assert fields[-1]["reason"] == "reached_max_restart_intensity"


def test_restarts_older_than_the_period_do_not_count_toward_the_intensity() -> None:
    # Tests the window with an injected clock: no sleeping.
    clock = FakeClock()
    sup = Supervisor.start("sup", intensity=1, period=5.0, clock=clock, children=[worker_spec("a")])

    def crash() -> None:
        victim = handle_of(sup, "a")
        victim.tell(Crash())
        wait_exit_processed(sup, "a", victim)

    crash()
    clock.advance(5.5)
    crash()  # the first restart has left the window: one restart in it
    assert sup.is_alive()
    clock.advance(5.0)
    crash()  # exactly `period` later the second still counts: two in the window
    assert sup.actor_stopped.wait(WAIT)


def test_failed_restart_is_retried_through_the_mailbox_and_queries_are_served_between() -> None:
    # Tests OTP-9549: a restart whose start raises marks the child restarting and queues a
    # retry, so a query sent meanwhile is answered before the next attempt.
    attempts: list[int] = []
    entered, go = threading.Event(), threading.Event()

    def start() -> Any:
        attempts.append(len(attempts))
        if len(attempts) == 2:
            entered.set()
            go.wait(WAIT)
            msg = "not yet"
            raise RuntimeError(msg)
        return Worker.start()

    sup = Supervisor.start("sup", intensity=5, children=[ChildSpec("a", start)])
    first = handle_of(sup, "a")
    first.tell(Crash())
    assert entered.wait(WAIT)
    query = sup.ask(ProxyCall(("which_children",), (), {}), block=False)
    go.set()
    (during,) = query.get(timeout=WAIT)
    assert (during.state, during.handle) == ("restarting", None)
    wait_until(lambda: (info := child(sup, "a")) is not None and info.state == "running")
    assert len(attempts) == 3
    info = child(sup, "a")
    assert info is not None
    assert info.restarts == 1


def test_restart_that_keeps_failing_counts_toward_intensity_until_the_supervisor_gives_up() -> None:
    attempts: list[int] = []

    def start() -> Any:
        attempts.append(len(attempts))
        if len(attempts) > 1:
            msg = "broken for good"
            raise RuntimeError(msg)
        return Worker.start()

    sup = Supervisor.start("sup", intensity=3, period=60.0, children=[ChildSpec("a", start)])
    handle_of(sup, "a").tell(Crash())
    assert sup.actor_stopped.wait(WAIT)
    # Restarts 1..3 are attempted and fail; the 4th exceeds the intensity.
    assert len(attempts) == 1 + 3


def test_stale_death_notice_is_ignored() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("a")])
    current = handle_of(sup, "a")
    sup.tell(_ChildExit("a", 0, RuntimeError("an older instance")))
    assert handle_of(sup, "a") is current
    assert current.is_alive()


def _middle(child_restart: str = "permanent") -> Any:
    return Supervisor.start(
        "mid",
        intensity=2,
        period=60.0,
        children=[
            worker_spec("w", name="w", restart=child_restart),
            worker_spec("v", name="v"),
        ],
    )


def test_escalation_restarts_the_middle_supervisor_with_fresh_children() -> None:
    # Tests two-level escalation: w crashes three times, mid exceeds its intensity (2) and
    # fails, top restarts mid, which starts w and v afresh.
    top = Supervisor.start(
        "top",
        intensity=3,
        period=60.0,
        children=[ChildSpec("mid", _middle, kind="supervisor")],
    )
    registry = get_registry(top)
    mid = actor(registry.lookup("mid"))
    v = registry.lookup("v")
    for _ in range(3):
        w = actor(registry.lookup("w"))
        w.tell(Crash())
        wait_rebound(registry, "w", w)
    new_mid = actor(registry.lookup("mid"))
    assert new_mid is not mid
    assert not mid.is_alive()
    (mid_info,) = which_children(top)
    assert mid_info.handle is new_mid
    assert mid_info.restarts == 1
    assert mid_info.last_exit == "reached_max_restart_intensity"
    fresh = {c.id: c for c in which_children(new_mid)}
    assert {c.state for c in fresh.values()} == {"running"}
    assert {c.restarts for c in fresh.values()} == {0}
    assert fresh["v"].handle is not v


def test_escalation_reaches_the_root_when_its_intensity_is_exceeded_too(
    new_actors: Callable[[], list[Any]],
) -> None:
    top = Supervisor.start(
        "top", intensity=0, children=[ChildSpec("mid", _middle, kind="supervisor")]
    )
    registry = get_registry(top)
    for _ in range(3):
        w = actor(registry.wait_for("w", timeout=WAIT))
        w.tell(Crash())
        assert w.actor_stopped.wait(WAIT)
    assert top.actor_stopped.wait(WAIT)
    wait_until(lambda: new_actors() == [])
    assert registry.names() == []
