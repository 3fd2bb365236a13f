"""Exit reasons, and the one definition of a normal exit.

An exit reason is any object. The library produces these:

- ``"normal"``: an actor stopped (it stopped itself, or someone called ``ref.stop()``), or a
  process exited with code 0;
- ``"shutdown"``: the supervisor stopped the child;
- ``"killed"``: the supervisor killed the child after its shutdown timeout, or brutally;
- ``"noproc"``: a plain Pykka actor was already dead when the supervisor started watching it,
  so its real reason is unknown;
- ``"reached_max_restart_intensity"``: a supervisor gave up;
- an exception instance: an actor crashed with it;
- `ProcessExit`: a process exited with a nonzero code or was killed by a signal.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass
from typing import Final

from supervisors._errors import ActorExit, ActorKilledError

__all__ = [
    "NORMAL",
    "SHUTDOWN",
    "KILLED",
    "NOPROC",
    "REACHED_MAX_RESTART_INTENSITY",
    "ProcessExit",
    "is_normal_exit",
    "reason_from_exception",
    "describe_reason",
]

NORMAL: Final = "normal"
SHUTDOWN: Final = "shutdown"
KILLED: Final = "killed"
NOPROC: Final = "noproc"
REACHED_MAX_RESTART_INTENSITY: Final = "reached_max_restart_intensity"


@dataclass(frozen=True)
class ProcessExit:
    """How an OS process ended, when it did not exit with code 0.

    Attributes:
        exitcode: the exit code; negative when a signal killed the process, as in `subprocess`.
    """

    exitcode: int

    @property
    def signal(self) -> str | None:
        """The name of the signal that killed the process (``"SIGSEGV"``), or None."""
        return signal_name(self.exitcode)

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by {self.signal}"
        return f"exit code {self.exitcode}"


def signal_name(exitcode: int | None) -> str | None:
    """Return the name of the signal encoded in a negative exit code, or None."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return _signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def is_normal_exit(reason: object) -> bool:
    """Tell whether `reason` is a normal exit, as OTP defines it.

    Normal reasons are ``"normal"``, ``"shutdown"`` and ``("shutdown", term)``. Only an
    abnormal exit restarts a transient child, and only an abnormal exit of a temporary child
    is reported.
    """
    if isinstance(reason, str):
        return reason in (NORMAL, SHUTDOWN)
    return isinstance(reason, tuple) and len(reason) == 2 and reason[0] == SHUTDOWN


def reason_from_exception(exc: BaseException) -> object:
    """Map an exception that ended an actor to its exit reason."""
    if isinstance(exc, ActorExit):
        return exc.reason
    if isinstance(exc, ActorKilledError):
        return KILLED
    return exc


def describe_reason(reason: object) -> str:
    """Render a reason as a short string for logs and snapshots."""
    if isinstance(reason, str):
        return reason
    if isinstance(reason, BaseException):
        text = str(reason)
        return f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    if isinstance(reason, ProcessExit):
        return str(reason)
    return repr(reason)
