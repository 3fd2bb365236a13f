"""How an actor's exit reason is known: `SupervisedActor`, `fatal`, and hooks for plain actors.

Pykka routes failures like this (see ``pykka/_actor.py``): an exception from an `ask` goes
back to the caller and the actor lives on; an exception from a `tell` runs `_handle_failure`
(which logs, unregisters and sets ``actor_stopped``) and then `on_failure`, and the actor
stops; a failure in `on_start` or `on_stop` goes through `_handle_failure` too; a stop goes
through `_stop`. Recording a reason therefore means hooking `_handle_failure` and `_stop`.

`SupervisedActor` overrides them, so its reason is exact from its first instruction, and adds
`exit(reason)` and the `fatal` decorator, which end the actor from an `ask` as well. A plain
`pykka.ThreadingActor` child gets the same hooks installed on the instance right after its
`start` returns; if it died before that, its reason is unknown and counts as abnormal
(``"noproc"``).
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, NoReturn, ParamSpec, TypeVar

import pykka
from pykka._envelope import Envelope

from supervisors._errors import ActorExit, ActorKilledError
from supervisors._reason import NORMAL, is_normal_exit, reason_from_exception

if TYPE_CHECKING:
    from pykka._actor import ActorInbox

__all__ = ["KILL_MESSAGE", "ExitRecord", "SupervisedActor", "fatal", "exit_record_of"]

P = ParamSpec("P")
R = TypeVar("R")
SA = TypeVar("SA", bound="SupervisedActor")


class ExitRecord:
    """The exit reason of one actor instance, filled in by its hooks.

    The first abnormal reason wins; a normal one never replaces anything (a stop whose
    `on_stop` then raises ends abnormally, with the exception).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: object = None
        self._recorded = False

    @property
    def recorded(self) -> bool:
        """Whether any reason was recorded."""
        return self._recorded

    @property
    def reason(self) -> object:
        """The reason, or None if none was recorded."""
        return self._reason

    def record(self, reason: object) -> None:
        """Record `reason` unless a reason that takes precedence is already there."""
        with self._lock:
            if not self._recorded or (is_normal_exit(self._reason) and not is_normal_exit(reason)):
                self._reason = reason
                self._recorded = True


class _Kill:
    """Stands for a kill that landed while the actor waited for a message."""


_KILL = _Kill()
KILL_MESSAGE: object = _KILL
"""Told to a `SupervisedActor`, this fails it with ``"killed"`` (see `supervisors.kill`)."""


class _TrackingInbox(queue.Queue["Envelope[Any]"]):
    """An inbox that remembers the envelope being handled, to tell a `tell` from an `ask`.

    A kill injected while the actor waits here (outside Pykka's handlers, where it would end
    the thread without Pykka's cleanup) is turned into a message that fails like a tell.
    """

    current: Envelope[Any] | None = None

    def get(self, block: bool = True, timeout: float | None = None) -> Envelope[Any]:
        try:
            envelope = super().get(block, timeout)
        except ActorKilledError:
            envelope = Envelope(_KILL)
        self.current = envelope
        return envelope


class SupervisedActor(pykka.ThreadingActor):
    """A Pykka actor whose exit reason its supervisor knows exactly.

    Use it as the base class of supervised workers. Beyond `pykka.ThreadingActor` it
    records why it ended, and can end itself from any handler:

    - `exit(reason)` ends the actor now with `reason`;
    - a method decorated with `fatal` returns its exception to the asker *and* ends the actor
      with it (a plain `ask` failure leaves the actor running, as in Pykka).

    When an exit ends the actor, the rest of its inbox is answered with
    `pykka.ActorDeadError`, as after any stop. `on_stop` runs for a normal reason and
    `on_failure` for an abnormal one, once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._exit_record = ExitRecord()
        self._fatal_exception: BaseException | None = None

    @staticmethod
    def _create_actor_inbox() -> ActorInbox:
        return _TrackingInbox()

    @property
    def exit_reason(self) -> object:
        """Why the actor ended (None while it runs). Read it from any thread."""
        return self._exit_record.reason

    def exit(self, reason: object = NORMAL) -> NoReturn:
        """End this actor now, with `reason` as its exit reason.

        Call it from a handler (or `on_start`); it raises `ActorExit` to unwind the handler.
        The asker of the current message, if any, receives that `ActorExit`. A normal reason
        (``"normal"``, ``"shutdown"``, ``("shutdown", term)``) does not restart a transient
        child; anything else is a crash. From `on_start`, as for any failure there, neither
        `on_stop` nor `on_failure` runs.
        """
        raise ActorExit(reason)

    def _stop(self) -> None:
        self._exit_record.record(NORMAL)
        super()._stop()

    def _handle_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exception_value is not None:
            self._exit_record.record(reason_from_exception(exception_value))
        if isinstance(exception_value, ActorExit):
            # A deliberate exit, not a bug: no traceback; the supervisor reports the reason.
            pykka.ActorRegistry.unregister(self.actor_ref)
            self.actor_stopped.set()
            return
        super()._handle_failure(exception_type, exception_value, traceback)

    def _handle_receive(self, message: Any) -> Any:
        if message is _KILL:
            raise ActorKilledError
        try:
            return super()._handle_receive(message)
        except Exception as exc:
            if isinstance(exc, ActorExit):
                reason = exc.reason
            elif exc is self._fatal_exception:
                reason = exc
            else:
                raise
            self._fatal_exception = None
            inbox = self.actor_inbox
            asked = (
                isinstance(inbox, _TrackingInbox)
                and inbox.current is not None
                and inbox.current.reply_to is not None
            )
            self._exit_record.record(reason)
            if is_normal_exit(reason):
                self._stop()
                if asked:
                    raise
                return None
            if asked:
                # Pykka would hand the exception to the asker and keep going: stop here,
                # and run the failure hook that Pykka runs for a failed tell.
                pykka.ActorRegistry.unregister(self.actor_ref)
                self.actor_stopped.set()
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    super()._handle_failure(*sys.exc_info())
            raise


def fatal(method: Callable[Concatenate[SA, P], R]) -> Callable[Concatenate[SA, P], R]:
    """Make an exception escaping `method` end the actor, even when it was asked.

    The asker still receives the exception; then the actor stops with it as an abnormal exit
    reason, and its supervisor applies the restart strategy. Only for `SupervisedActor`
    methods.
    """

    @functools.wraps(method)
    def wrapper(self: SA, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, ActorExit):
                self._fatal_exception = exc
            raise

    return wrapper


def exit_record_of(actor: pykka.Actor) -> ExitRecord:
    """Return the record that will hold `actor`'s exit reason, hooking a plain actor.

    For a `SupervisedActor` this is its own record. For any other actor, `_handle_failure`
    and `_stop` are wrapped on the instance; whatever happened before that is not seen.
    """
    if isinstance(actor, SupervisedActor):
        return actor._exit_record
    record = ExitRecord()
    handle_failure = actor._handle_failure
    stop = actor._stop

    def hooked_handle_failure(
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exception_value is not None:
            record.record(reason_from_exception(exception_value))
        handle_failure(exception_type, exception_value, traceback)

    def hooked_stop() -> None:
        record.record(NORMAL)
        stop()

    vars(actor)["_handle_failure"] = hooked_handle_failure
    vars(actor)["_stop"] = hooked_stop
    return record
