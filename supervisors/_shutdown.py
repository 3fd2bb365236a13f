"""Stopping a child: ask politely, wait its shutdown timeout, then kill.

An actor is asked with ``ref.stop()``. To kill it, `ActorKilledError` is injected into its
thread with ``PyThreadState_SetAsyncExc``: an `Exception`, not a `BaseException`, because
Pykka stops every actor in the process on a `BaseException`. The interpreter raises it at the
thread's next bytecode, so a handler spinning in Python dies at once, but code blocked inside
a C call (a sleep, a lock, a socket, a C extension) only sees it when that call returns, and
code that catches `Exception` and carries on survives it. The supervisor does not wait for a
killed actor: it marks it killed and moves on (a stop is queued too, for a kill that lands in
an `ask` handler, which Pykka hands to the asker).

A kill that lands while the actor waits for a message is outside Pykka's handlers: a
`SupervisedActor` turns it into a failure like any other; a plain Pykka actor's thread dies
with a traceback on stderr, and its monitor then does Pykka's cleanup (sets
``actor_stopped``, unregisters it, answers the callers left in its inbox).

A supervisor child should keep its default ``infinity`` shutdown: killing a supervisor in
the middle of stopping its own children leaves those it had not reached running.

A process gets SIGTERM, then SIGKILL after the timeout; ``brutal_kill`` is SIGKILL at once.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import pykka

from supervisors._errors import ActorKilledError
from supervisors._process import ProcessChild
from supervisors._reason import KILLED, NORMAL, SHUTDOWN, ProcessExit
from supervisors._spec import Shutdown
from supervisors._types import Handle
from supervisors._watch import Monitor

__all__ = ["kill_thread", "shutdown_actor", "shutdown_process", "shutdown_instance"]

_REAP_AFTER_SIGKILL = 5.0  # seconds to wait for the kernel to reap a SIGKILLed process


def kill_thread(thread: threading.Thread) -> bool:
    """Raise `ActorKilledError` in `thread` at its next bytecode.

    Returns:
        Whether the exception was scheduled (False if the thread has already ended).
    """
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return False
    scheduled = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(ActorKilledError)
    )
    if scheduled > 1:
        # Cannot happen with a valid id; undo rather than hit several threads.
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
        return False
    return bool(scheduled == 1)


def _timeout(shutdown: Shutdown) -> float | None:
    return None if shutdown == "infinity" else float(shutdown)


def shutdown_actor(ref: pykka.ActorRef[Any], monitor: Monitor, shutdown: Shutdown) -> object:
    """Stop an actor child within `shutdown`, killing it if it does not stop in time.

    Returns:
        Its exit reason: ``"killed"`` if it was killed, else what its monitor recorded.
    """
    if shutdown != "brutal_kill":
        ref.stop(block=False)
        if monitor.wait(_timeout(shutdown)):
            return monitor.reason
    monitor.mark_killed()
    if monitor.thread is not None:
        kill_thread(monitor.thread)
    # If the kill lands in an ask handler, the actor lives on: this stop then ends it.
    ref.stop(block=False)
    return KILLED


def shutdown_process(process: ProcessChild, monitor: Monitor, shutdown: Shutdown) -> object:
    """Stop a process child: SIGTERM, wait `shutdown`, then SIGKILL.

    Returns:
        ``"shutdown"`` if SIGTERM ended it, ``"normal"`` if it exited with 0, ``"killed"``
        if it had to be killed, else its `ProcessExit`.
    """
    if shutdown != "brutal_kill":
        process.terminate()
        if monitor.wait(_timeout(shutdown)):
            reason = monitor.reason
            if isinstance(reason, ProcessExit) and reason.signal == "SIGTERM":
                return SHUTDOWN
            return NORMAL if reason == NORMAL else reason
    process.kill()
    monitor.wait(_REAP_AFTER_SIGKILL)
    return KILLED


def shutdown_instance(handle: Handle, monitor: Monitor, shutdown: Shutdown | None) -> object:
    """Stop an actor or a process child (see above); close a process's channel afterwards."""
    assert shutdown is not None  # ChildSpec resolves the default when it is built
    if isinstance(handle, ProcessChild):
        reason = shutdown_process(handle, monitor, shutdown)
        handle.close()
        return reason
    return shutdown_actor(handle, monitor, shutdown)
