"""Injecting a crash into a running child: `kill` (OTP's ``exit(Pid, kill)``)."""

from __future__ import annotations

import contextlib

import pykka

from supervisors._actor import KILL_MESSAGE, SupervisedActor
from supervisors._errors import NoProcError
from supervisors._process import ProcessChild
from supervisors._shutdown import kill_thread
from supervisors._types import Handle
from supervisors._watch import find_actor_thread

__all__ = ["kill"]


class _Wake:
    """Wakes an idle plain actor so that the exception injected into its thread lands."""


def kill(handle: Handle) -> None:
    """Crash a child instance as if it had died abnormally; its supervisor then applies
    the restart strategy (the exit reason is ``"killed"``).

    A process is sent SIGKILL. A `SupervisedActor` is failed through its mailbox (it dies
    when it reaches the kill, after the message it is handling). A plain Pykka actor gets
    `ActorKilledError` injected into its thread.

    Raises:
        NoProcError: the instance has already ended.
    """
    if isinstance(handle, ProcessChild):
        if not handle.alive:
            msg = f"{handle!r} has already exited"
            raise NoProcError(msg)
        handle.kill()
        return
    actor = handle._actor_weakref()
    if actor is None or not handle.is_alive():
        msg = f"{handle} has already stopped"
        raise NoProcError(msg)
    if isinstance(actor, SupervisedActor):
        handle.tell(KILL_MESSAGE)
        return
    thread = find_actor_thread(actor)
    if thread is None or not kill_thread(thread):
        msg = f"{handle} has no running thread"
        raise NoProcError(msg)
    with contextlib.suppress(pykka.ActorDeadError):
        handle.tell(_Wake())
