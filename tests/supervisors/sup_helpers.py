"""Test actors, process targets and waiting helpers for the supervisors tests.

Process targets live here, in an importable module, because a process child is a fresh
interpreter that imports its target by module name.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pykka

from supervisors import (
    Channel,
    ChildInfo,
    ChildSpec,
    ProcessChild,
    Registry,
    SupervisedActor,
    fatal,
    which_children,
)

T = TypeVar("T")

WAIT = 5.0  # seconds: the bound on every wait in these tests; reaching it means failure


def wait_until(predicate: Callable[[], T], timeout: float = WAIT, interval: float = 0.002) -> T:
    """Poll `predicate` until it returns something truthy, for state no event announces."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            msg = f"condition not met within {timeout} s"
            raise AssertionError(msg)
        time.sleep(interval)


def actor(handle: object) -> pykka.ActorRef[Any]:
    """Narrow a child's handle to an actor ref."""
    assert isinstance(handle, pykka.ActorRef), handle
    return handle


def process(handle: object) -> ProcessChild:
    """Narrow a child's handle to a process child."""
    assert isinstance(handle, ProcessChild), handle
    return handle


def report(record: logging.LogRecord) -> dict[str, Any]:
    """The four structured fields of a supervisors log record."""
    return {
        key: record.__dict__.get(key) for key in ("supervisor", "context", "reason", "offender")
    }


def reports(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    """The structured fields of the records logged on the supervisors logger."""
    return [report(r) for r in records if r.name == "supervisors"]


def child(sup: pykka.ActorRef[Any], child_id: str) -> ChildInfo | None:
    """The `ChildInfo` of one child, or None if the supervisor has no such child."""
    return next((c for c in which_children(sup, timeout=WAIT) if c.id == child_id), None)


def handle_of(sup: pykka.ActorRef[Any], child_id: str) -> Any:
    info = child(sup, child_id)
    assert info is not None, f"no child {child_id!r}"
    return info.handle


def wait_rebound(registry: Registry, name: str, old: object) -> Any:
    """Wait until `name` is bound to a live instance other than `old`, and return it."""

    def rebound() -> Any:
        handle = registry.whereis(name)
        return handle if handle is not None and handle is not old else None

    return wait_until(rebound)


def wait_exit_processed(sup: pykka.ActorRef[Any], child_id: str, old: object) -> None:
    """Wait until the supervisor has handled the death of `old`, the instance of `child_id`.

    All of one death's consequences are applied in one message, so once the child's entry
    no longer shows `old` running, the supervisor is done with it (or is dead).
    """

    def processed() -> bool:
        if not sup.is_alive():
            return True
        try:
            info = child(sup, child_id)
        except pykka.ActorDeadError:
            return True
        return info is None or info.handle is not old or info.state != "running"

    wait_until(processed)


class FakeClock:
    """Monotonic seconds that move only when told to (inject it as a supervisor's clock)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crash:
    """Raise in a tell handler (an abnormal exit)."""


@dataclass(frozen=True)
class Exit:
    """Call SupervisedActor.exit(reason)."""

    reason: object


@dataclass(frozen=True)
class StopSelf:
    """Stop the actor from inside (a normal exit)."""


@dataclass(frozen=True)
class Hang:
    """Spin in the handler until `release` is set (a child that ignores stop)."""

    release: threading.Event
    entered: threading.Event = field(default_factory=threading.Event)


# -- actors --------------------------------------------------------------------------------


class Worker(SupervisedActor):
    """A supervised worker that does what its messages say and logs its stop."""

    def __init__(self, label: str = "", events: list[str] | None = None) -> None:
        super().__init__()
        self.label = label
        self._events = events

    def on_stop(self) -> None:
        if self._events is not None:
            self._events.append(f"stop {self.label}")

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Crash):
            msg = f"{self.label} crashed"
            raise RuntimeError(msg)
        if isinstance(message, Exit):
            self.exit(message.reason)
        if isinstance(message, StopSelf):
            self.stop()
        if isinstance(message, Hang):
            message.entered.set()
            while not message.release.is_set():
                time.sleep(0.002)
        return None

    def ping(self) -> str:
        return "pong"

    @fatal
    def fail_fatally(self) -> None:
        msg = "fatal failure"
        raise ValueError(msg)

    def fail(self) -> None:
        msg = "ordinary failure"
        raise ValueError(msg)


class PlainWorker(pykka.ThreadingActor):
    """A plain Pykka actor (not a SupervisedActor)."""

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Crash):
            msg = "plain crash"
            raise RuntimeError(msg)
        if isinstance(message, StopSelf):
            self.stop()
        return None


def worker_spec(child_id: str, events: list[str] | None = None, **options: Any) -> ChildSpec:
    """A spec whose start builds a `Worker` labelled with the child id."""
    return ChildSpec(child_id, lambda: Worker.start(child_id, events), **options)


# -- process targets -----------------------------------------------------------------------


def obedient(channel: Channel, ignore_sigterm: bool = False) -> None:
    """Announce the pid, then obey commands until the channel closes."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files from segv/abort
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel.send(("ready", os.getpid()))
    while True:
        try:
            command = channel.recv()
        except EOFError:
            return
        if command == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif command == "abort":
            os.abort()
        elif command == "raise":
            msg = "target failed"
            raise RuntimeError(msg)
        elif isinstance(command, tuple) and command[0] == "exit":
            sys.exit(command[1])
        elif isinstance(command, tuple) and command[0] == "echo":
            channel.send(command[1])
        elif command == "return":
            return


def sleep_forever(channel: Channel) -> None:
    """Announce the pid, then ignore the channel: only a signal ends this child."""
    channel.send(("ready", os.getpid()))
    while True:
        time.sleep(60)


def echo_args(channel: Channel, *args: object) -> None:
    """Send back the arguments and the interpreter's view of the world, then return."""
    main = sys.modules["__main__"]
    channel.send(
        {
            "args": args,
            "main_file": getattr(main, "__file__", None),
            "sys_path": list(sys.path),
            "ppid": os.getppid(),
        }
    )


def read_fd(channel: Channel) -> None:
    """Receive a file descriptor and send back what it reads."""
    channel.send("ready")
    _data, fds = channel.recv_fds(16, 1)
    with os.fdopen(fds[0], "rb") as stream:
        channel.send(stream.read())


def spawn_obedient(ignore_sigterm: bool = False) -> ProcessChild:
    return ProcessChild.spawn(obedient, ignore_sigterm)


def ready_pid(process: ProcessChild) -> int:
    """Wait for the child's ready message and return its pid."""
    assert process.channel.poll(WAIT), "the process child did not report ready"
    tag, pid = process.channel.recv()
    assert tag == "ready"
    assert isinstance(pid, int)
    return pid
