"""The exceptions of the supervisors library.

What to catch::

    SupervisorError              anything the supervision API refuses
    ├── SupervisorConfigError    a flag or child spec is invalid (also a ValueError)
    ├── ChildNotFoundError       no child with that id (also a LookupError)
    ├── ChildStateError          the child is in the wrong state for the operation
    ├── AlreadyRegisteredError   a registry name is bound to another live instance
    └── NoProcError              no live instance bound to a registry name (also a LookupError)

    ActorExit                    raised by SupervisedActor.exit() to end the actor with a reason
    ActorKilledError             injected into an actor's thread to kill it

`ActorExit` and `ActorKilledError` are control flow, not errors of the API: they derive from
`Exception` (not `BaseException`, which makes Pykka stop every actor in the process).
"""

from __future__ import annotations

__all__ = [
    "SupervisorError",
    "SupervisorConfigError",
    "ChildNotFoundError",
    "ChildStateError",
    "AlreadyRegisteredError",
    "NoProcError",
    "ActorExit",
    "ActorKilledError",
]


class SupervisorError(Exception):
    """Base class of the errors raised by the supervision API."""


class SupervisorConfigError(SupervisorError, ValueError):
    """A supervisor flag or a child spec is invalid.

    Raised by `Supervisor.start`, `Supervisor.start_child`, `check_child_specs` and
    `check_supervisor_flags` before anything is started.

    Attributes:
        key: the path of the offending field, e.g. ``children[2].restart``.
        reason: what is wrong with it, quoting the value.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class ChildNotFoundError(SupervisorError, LookupError):
    """The supervisor has no child with the given id (OTP's ``not_found``)."""


class ChildStateError(SupervisorError):
    """The child exists but its state forbids the operation.

    For example `restart_child` or `delete_child` on a running child, or `start_child` with
    the id of a child that is already present (OTP's ``running``, ``restarting``,
    ``already_present``).
    """


class AlreadyRegisteredError(SupervisorError):
    """A registry name is already bound to another instance that is still alive."""


class NoProcError(SupervisorError, LookupError):
    """No live instance is bound to the registry name (OTP's ``noproc``)."""


class ActorExit(Exception):
    """Raised by `SupervisedActor.exit` to end the actor with `reason`.

    An asker whose call made the actor exit receives this exception.

    Attributes:
        reason: the exit reason the supervisor sees.
    """

    def __init__(self, reason: object) -> None:
        super().__init__(reason)
        self.reason = reason


class ActorKilledError(Exception):
    """Injected into an actor's thread when a supervisor kills it.

    The interpreter raises it at the thread's next bytecode: code blocked inside a C call
    (a sleep, a lock, a socket read, a C extension) only sees it when that call returns.
    """
