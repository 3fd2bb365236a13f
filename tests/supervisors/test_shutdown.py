"""Stopping children: order, timeouts, kills (supervisors/_shutdown.py)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pykka
import pytest
from pykka.messages import ProxyCall
from sup_helpers import (
    WAIT,
    Hang,
    handle_of,
    ready_pid,
    reports,
    spawn_obedient,
    wait_until,
    worker_spec,
)

from supervisors import (
    ActorKilledError,
    ChildSpec,
    ProcessChild,
    Supervisor,
    get_registry,
    terminate_child,
    which_children,
)
from supervisors._shutdown import kill_thread
from supervisors._watch import Monitor, find_actor_thread


def _hang(ref: pykka.ActorRef[Any]) -> Hang:
    """Make `ref` spin in a tell handler, ignoring stop, until the returned Hang is released."""
    hang = Hang(threading.Event())
    ref.tell(hang)
    assert hang.entered.wait(WAIT)
    return hang


def _thread_of(ref: pykka.ActorRef[Any]) -> threading.Thread:
    actor = ref._actor_weakref()
    assert actor is not None
    thread = find_actor_thread(actor)
    assert thread is not None
    return thread


def _shutdown_errors(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [f for f in reports(caplog.records) if f["context"] == "shutdown_error"]


def test_children_are_stopped_in_reverse_start_order() -> None:
    events: list[str] = []
    sup = Supervisor.start(
        "sup", children=[worker_spec(c, events) for c in ("first", "second", "third")]
    )
    sup.stop()
    assert events == ["stop third", "stop second", "stop first"]


def test_nested_supervisor_stops_its_subtree_before_its_earlier_siblings() -> None:
    events: list[str] = []

    def middle() -> Any:
        return Supervisor.start("mid", children=[worker_spec(c, events) for c in ("m1", "m2")])

    sup = Supervisor.start(
        "top",
        children=[
            worker_spec("a", events),
            ChildSpec("mid", middle, kind="supervisor"),
            worker_spec("z", events),
        ],
    )
    sup.stop()
    assert events == ["stop z", "stop m2", "stop m1", "stop a"]


def test_child_that_ignores_stop_is_killed_after_its_shutdown_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = Supervisor.start("sup", children=[worker_spec("stuck", shutdown=0.3)])
    stuck = handle_of(sup, "stuck")
    thread = _thread_of(stuck)
    _hang(stuck)

    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="supervisors"):
        sup.stop(timeout=WAIT)
    elapsed = time.monotonic() - started

    # Never killed before its timeout. No upper bound: the child never stops by itself, so
    # `stop` returned because of the kill, which the report below names.
    assert elapsed >= 0.3
    thread.join(WAIT)
    assert not thread.is_alive()
    assert not stuck.is_alive()
    (fields,) = _shutdown_errors(caplog)
    assert fields["reason"] == "killed"
    assert fields["offender"]["id"] == "stuck"
    actor = stuck._actor_weakref()
    assert actor is None or actor.exit_reason == "killed"


def test_brutal_kill_does_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    sup = Supervisor.start("sup", children=[worker_spec("stuck", shutdown="brutal_kill")])
    stuck = handle_of(sup, "stuck")
    thread = _thread_of(stuck)
    _hang(stuck)
    waits: list[float | None] = []
    real_wait = Monitor.wait

    def noted_wait(monitor: Monitor, timeout: float | None = None) -> bool:
        waits.append(timeout)
        return real_wait(monitor, timeout)

    monkeypatch.setattr(Monitor, "wait", noted_wait)
    terminate_child(sup, "stuck", timeout=WAIT)
    assert waits == []  # killed without waiting for the child to stop (the default: 5 s)
    thread.join(WAIT)
    assert not thread.is_alive()


def test_brutal_kill_of_an_idle_actor_still_answers_its_callers() -> None:
    # The kill lands while the actor waits for a message, outside Pykka's handlers; the
    # monitor then does Pykka's cleanup, so nobody waits on a dead actor.
    sup = Supervisor.start("sup", children=[worker_spec("idle", shutdown="brutal_kill")])
    idle = handle_of(sup, "idle")
    thread = _thread_of(idle)
    terminate_child(sup, "idle", timeout=WAIT)
    thread.join(WAIT)
    assert not thread.is_alive()
    wait_until(lambda: not idle.is_alive())
    with pytest.raises(pykka.ActorDeadError):
        idle.ask("ping", timeout=WAIT)


def test_infinity_shutdown_waits_for_the_child_however_long_it_takes() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("slow", shutdown="infinity")])
    slow = handle_of(sup, "slow")
    hang = _hang(slow)
    done = sup.ask(ProxyCall(("terminate_child",), ("slow",), {}), block=False)
    with pytest.raises(pykka.Timeout):
        done.get(timeout=0.2)
    hang.release.set()
    done.get(timeout=WAIT)
    assert not slow.is_alive()
    (info,) = which_children(sup)
    assert (info.state, info.last_exit) == ("terminated", "shutdown")


def test_kill_landing_in_an_ask_handler_is_returned_to_the_asker_and_the_actor_stops() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("busy", shutdown=0.2)])
    busy = handle_of(sup, "busy")
    hang = Hang(threading.Event())
    answer = busy.ask(hang, block=False)
    assert hang.entered.wait(WAIT)
    terminate_child(sup, "busy", timeout=WAIT)
    with pytest.raises(ActorKilledError):
        answer.get(timeout=WAIT)
    wait_until(lambda: not busy.is_alive())


def test_kill_thread_reports_whether_it_scheduled_the_exception() -> None:
    finished = threading.Thread(target=lambda: None)
    finished.start()
    finished.join()
    assert not kill_thread(finished)


def test_process_child_is_stopped_with_sigterm(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor.start("sup", children=[ChildSpec("p", spawn_obedient, shutdown=2.0)])
    process: ProcessChild = handle_of(sup, "p")
    ready_pid(process)
    with caplog.at_level(logging.ERROR, logger="supervisors"):
        terminate_child(sup, "p", timeout=WAIT)
    assert process.exitcode == -15  # SIGTERM ended it, before the SIGKILL of its timeout
    assert process.signal == "SIGTERM"
    assert process.channel.closed
    assert _shutdown_errors(caplog) == []
    (info,) = which_children(sup)
    assert info.last_exit == "shutdown"


def test_process_child_that_ignores_sigterm_is_killed_after_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = Supervisor.start(
        "sup",
        children=[ChildSpec("p", lambda: spawn_obedient(ignore_sigterm=True), shutdown=0.3)],
    )
    process: ProcessChild = handle_of(sup, "p")
    ready_pid(process)  # the handler is installed before the child reports ready
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="supervisors"):
        sup.stop(timeout=WAIT)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.3  # never killed before its timeout; killed, as the exit code says
    assert process.exitcode == -9
    (fields,) = _shutdown_errors(caplog)
    assert fields["reason"] == "killed"
    assert fields["offender"]["pid"] == process.pid


def test_brutal_kill_of_a_process_child_sends_sigkill_at_once() -> None:
    sup = Supervisor.start(
        "sup",
        children=[
            ChildSpec("p", lambda: spawn_obedient(ignore_sigterm=True), shutdown="brutal_kill")
        ],
    )
    process: ProcessChild = handle_of(sup, "p")
    ready_pid(process)
    terminate_child(sup, "p", timeout=WAIT)
    assert process.exitcode == -9


def test_supervisor_unbinds_its_name_and_its_childrens_names_on_stop() -> None:
    sup = Supervisor.start("sup", children=[worker_spec("a", name="a")])
    registry = get_registry(sup)
    assert registry.names() == ["a", "sup"]
    sup.stop()
    assert registry.names() == []
