"""Death detection and exit reasons of actor children (supervisors/_actor.py, _watch.py)."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import pykka
import pytest
from sup_helpers import (
    WAIT,
    Crash,
    Exit,
    PlainWorker,
    StopSelf,
    Worker,
    child,
    handle_of,
    report,
    wait_exit_processed,
    wait_until,
)

from supervisors import (
    ActorExit,
    ChildInfo,
    ChildSpec,
    ProcessExit,
    SupervisedActor,
    Supervisor,
    fatal,
    is_normal_exit,
)
from supervisors._reason import describe_reason


class Hooked(SupervisedActor):
    """Records which Pykka hooks ran."""

    def __init__(self, hooks: list[str]) -> None:
        super().__init__()
        self.hooks = hooks

    def on_stop(self) -> None:
        self.hooks.append("on_stop")

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.hooks.append(f"on_failure {type(exception_value).__name__}")

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Exit):
            self.exit(message.reason)
        if isinstance(message, Crash):
            msg = "crash"
            raise RuntimeError(msg)
        return None

    def leave(self, reason: object) -> None:
        self.exit(reason)

    @fatal
    def explode(self) -> None:
        msg = "fatal"
        raise ValueError(msg)


class FailsInOnStop(SupervisedActor):
    def on_stop(self) -> None:
        msg = "cleanup failed"
        raise OSError(msg)


def _supervise(start: Any, restart: Any = "permanent") -> pykka.ActorRef[Any]:
    return Supervisor.start("sup", children=[ChildSpec("c", start, restart=restart)])


def _after_exit(sup: pykka.ActorRef[Any], old: object) -> ChildInfo:
    if old is None:
        # The first instance died before we could see it: wait for its restart instead.
        wait_until(lambda: (c := child(sup, "c")) is not None and c.restarts >= 1)
    else:
        wait_exit_processed(sup, "c", old)
    info = child(sup, "c")
    assert info is not None
    return info


@pytest.mark.parametrize(
    ("normal", "expected"),
    [
        ("normal", True),
        ("shutdown", True),
        (("shutdown", "upgrade"), True),
        ("killed", False),
        ("noproc", False),
        ("reached_max_restart_intensity", False),
        (RuntimeError("x"), False),
        (ProcessExit(1), False),
        (("shutdown", 1, 2), False),
        (None, False),
    ],
)
def test_normal_exit_is_normal_shutdown_or_shutdown_with_a_term(
    normal: object, expected: bool
) -> None:
    assert is_normal_exit(normal) is expected


def test_reasons_render_as_short_strings() -> None:
    assert describe_reason("normal") == "normal"
    assert describe_reason(RuntimeError("boom")) == "RuntimeError: boom"
    assert describe_reason(ValueError()) == "ValueError"
    assert describe_reason(ProcessExit(-11)) == "killed by SIGSEGV"
    assert describe_reason(("shutdown", 3)) == "('shutdown', 3)"


def test_tell_failure_is_an_abnormal_exit_with_the_exception_as_reason() -> None:
    sup = _supervise(lambda: Worker.start("c"), restart="transient")
    first = handle_of(sup, "c")
    first.tell(Crash())
    info = _after_exit(sup, first)
    assert info.state == "running"
    assert isinstance(info.last_exit, RuntimeError)
    assert str(info.last_exit) == "c crashed"


@pytest.mark.parametrize(
    ("message", "restarted", "last_exit"),
    [
        pytest.param(Crash(), True, "RuntimeError: plain crash", id="plain-abnormal"),
        pytest.param(StopSelf(), False, "normal", id="plain-normal"),
    ],
)
def test_plain_pykka_actor_exit_reason_is_known_from_hooks(
    message: object, restarted: bool, last_exit: str
) -> None:
    sup = _supervise(PlainWorker.start, restart="transient")
    first = handle_of(sup, "c")
    first.tell(message)
    info = _after_exit(sup, first)
    assert (info.state == "running") == restarted
    assert describe_reason(info.last_exit) == last_exit


@pytest.mark.parametrize(
    ("restart", "restarted"),
    [("permanent", True), ("transient", False)],
    ids=["permanent-normal", "transient-normal"],
)
def test_actor_stopped_by_someone_else_exits_normally(restart: str, restarted: bool) -> None:
    sup = _supervise(PlainWorker.start, restart=restart)
    first = handle_of(sup, "c")
    first.stop()
    info = _after_exit(sup, first)
    assert (info.state == "running") == restarted
    assert info.last_exit == "normal"


def test_plain_actor_that_died_before_it_was_watched_counts_as_abnormal() -> None:
    starts: list[int] = []

    class DiesAtOnce(pykka.ThreadingActor):
        def on_start(self) -> None:
            if len(starts) == 1:
                msg = "dead on arrival"
                raise RuntimeError(msg)

    def start() -> Any:
        starts.append(len(starts))
        ref = DiesAtOnce.start()
        if len(starts) == 1:
            assert ref.actor_stopped.wait(WAIT)  # dead before the supervisor can hook it
        return ref

    sup = _supervise(start, restart="transient")
    info = _after_exit(sup, None)
    assert (info.state, info.last_exit, info.restarts) == ("running", "noproc", 1)


def test_supervised_actor_records_an_on_start_failure_exactly() -> None:
    starts: list[int] = []

    class FailsOnce(SupervisedActor):
        def on_start(self) -> None:
            starts.append(len(starts))
            if len(starts) == 1:
                msg = "bad start"
                raise RuntimeError(msg)

    sup = _supervise(FailsOnce.start, restart="transient")
    info = _after_exit(sup, None)
    assert info.state == "running"
    assert describe_reason(info.last_exit) == "RuntimeError: bad start"


@pytest.mark.parametrize(
    ("reason", "restarted", "hooks"),
    [
        pytest.param("bad_state", True, ["on_failure ActorExit"], id="abnormal"),
        pytest.param("normal", False, ["on_stop"], id="normal"),
        pytest.param(("shutdown", "done"), False, ["on_stop"], id="shutdown-term"),
    ],
)
def test_exit_from_a_tell_handler_ends_the_actor_with_that_reason(
    reason: object, restarted: bool, hooks: list[str]
) -> None:
    recorded: list[str] = []
    sup = _supervise(lambda: Hooked.start(recorded), restart="transient")
    first = handle_of(sup, "c")
    first.tell(Exit(reason))
    info = _after_exit(sup, first)
    assert (info.state == "running") == restarted
    assert info.last_exit == reason
    assert recorded == hooks


@pytest.mark.parametrize(
    ("reason", "restarted", "hooks"),
    [
        pytest.param("bad_state", True, ["on_failure ActorExit"], id="abnormal"),
        pytest.param("normal", False, ["on_stop"], id="normal"),
    ],
)
def test_exit_from_an_ask_handler_answers_the_asker_and_ends_the_actor(
    reason: object, restarted: bool, hooks: list[str]
) -> None:
    recorded: list[str] = []
    sup = _supervise(lambda: Hooked.start(recorded), restart="transient")
    first = handle_of(sup, "c")
    with pytest.raises(ActorExit) as raised:
        first.proxy().leave(reason).get(timeout=WAIT)
    assert raised.value.reason == reason
    info = _after_exit(sup, first)
    assert (info.state == "running") == restarted
    assert info.last_exit == reason
    assert recorded == hooks


def test_fatal_method_returns_its_exception_to_the_asker_and_crashes_the_actor() -> None:
    recorded: list[str] = []
    sup = _supervise(lambda: Hooked.start(recorded), restart="transient")
    first = handle_of(sup, "c")
    with pytest.raises(ValueError, match="fatal") as raised:
        first.proxy().explode().get(timeout=WAIT)
    info = _after_exit(sup, first)
    assert info.state == "running"
    assert info.last_exit is raised.value
    assert recorded == ["on_failure ValueError"]


def test_fatal_method_called_with_tell_crashes_the_actor_once() -> None:
    recorded: list[str] = []
    sup = _supervise(lambda: Hooked.start(recorded), restart="transient")
    first = handle_of(sup, "c")
    first.proxy().explode.defer()
    info = _after_exit(sup, first)
    assert info.state == "running"
    assert isinstance(info.last_exit, ValueError)
    assert recorded == ["on_failure ValueError"]


def test_ordinary_ask_failure_goes_to_the_asker_and_the_actor_lives_on() -> None:
    sup = _supervise(lambda: Worker.start("c"))
    worker = handle_of(sup, "c")
    with pytest.raises(ValueError, match="ordinary"):
        worker.proxy().fail().get(timeout=WAIT)
    assert worker.proxy().ping().get(timeout=WAIT) == "pong"
    assert handle_of(sup, "c") is worker


def test_failing_on_stop_turns_a_normal_exit_into_an_abnormal_one() -> None:
    sup = _supervise(FailsInOnStop.start, restart="transient")
    first = handle_of(sup, "c")
    first.stop()
    info = _after_exit(sup, first)
    assert info.state == "running"
    assert describe_reason(info.last_exit) == "OSError: cleanup failed"


def test_callers_waiting_on_a_dead_child_get_an_answer() -> None:
    sup = _supervise(lambda: Hooked.start([]))
    first = handle_of(sup, "c")
    first.tell(Exit("bad_state"))
    with pytest.raises(pykka.ActorDeadError):
        first.ask("late", timeout=WAIT)


def test_each_death_is_one_report_and_each_start_one_progress_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="supervisors"):
        sup = _supervise(lambda: Worker.start("c"))
        first = handle_of(sup, "c")
        first.tell(Crash())
        wait_exit_processed(sup, "c", first)
    records = [r for r in caplog.records if r.name == "supervisors"]
    assert [(r.levelname, report(r)["context"]) for r in records] == [
        ("DEBUG", "progress"),
        ("ERROR", "child_terminated"),
        ("DEBUG", "progress"),
    ]
    fields = report(records[1])
    assert fields["supervisor"] == "sup"
    assert fields["reason"] == "RuntimeError: c crashed"
    offender = fields["offender"]
    assert offender == {
        "id": "c",
        "name": None,
        "pid": None,
        "thread": offender["thread"],
        "restart": "permanent",
        "shutdown": 5.0,
        "kind": "worker",
    }
    assert offender["thread"].startswith("Worker-")


def test_transient_child_is_not_restarted_after_normal_exit() -> None:
    sup = _supervise(lambda: Worker.start("c"), restart="transient")
    first = handle_of(sup, "c")
    first.tell(StopSelf())
    info = _after_exit(sup, first)
    assert (info.state, info.handle, info.last_exit) == ("terminated", None, "normal")
