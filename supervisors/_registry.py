"""Names that survive restarts: a registry owned by a supervision tree.

A restarted child is a new actor (a new `ActorRef`) or a new process, so callers should
address it by name. Supervisors bind their own name and their named children's names,
unbind them when the instance ends, and rebind them to the new instance after a restart.
Unlike Pykka's `ActorRegistry`, this is an instance, not global state: each tree has one,
shared by its nested supervisors.
"""

from __future__ import annotations

import threading
import time

from supervisors._errors import AlreadyRegisteredError, NoProcError
from supervisors._process import ProcessChild
from supervisors._types import Handle

__all__ = ["Registry", "is_alive"]


def is_alive(handle: Handle) -> bool:
    """Whether the actor has not stopped, or the process has not been reaped."""
    if isinstance(handle, ProcessChild):
        return handle.alive
    return handle.is_alive()


class Registry:
    """A thread-safe map from names to the current instance of a child.

    Every method is atomic and may be called from any thread; none goes through an actor's
    mailbox.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._names: dict[str, Handle] = {}

    def __repr__(self) -> str:
        return f"<Registry {sorted(self._names)!r}>"

    def bind(self, name: str, handle: Handle) -> None:
        """Bind `name` to `handle`, replacing a binding whose instance has died.

        Raises:
            AlreadyRegisteredError: `name` is bound to another instance that is still alive.
        """
        with self._changed:
            current = self._names.get(name)
            if current is not None and current is not handle and is_alive(current):
                msg = f"name {name!r} is already bound to {current!r}"
                raise AlreadyRegisteredError(msg)
            self._names[name] = handle
            self._changed.notify_all()

    def unbind(self, name: str, handle: Handle | None = None) -> bool:
        """Remove `name`; if `handle` is given, only while `name` is still bound to it.

        Returns:
            Whether a binding was removed.
        """
        with self._changed:
            current = self._names.get(name)
            if current is None or (handle is not None and current is not handle):
                return False
            del self._names[name]
            self._changed.notify_all()
            return True

    def whereis(self, name: str) -> Handle | None:
        """Return the live instance bound to `name`, or None."""
        with self._changed:
            handle = self._names.get(name)
        return handle if handle is not None and is_alive(handle) else None

    def lookup(self, name: str) -> Handle:
        """Return the live instance bound to `name`.

        Raises:
            NoProcError: nothing live is bound to `name`.
        """
        handle = self.whereis(name)
        if handle is None:
            msg = f"no live instance is bound to {name!r}"
            raise NoProcError(msg)
        return handle

    def wait_for(self, name: str, timeout: float | None = None) -> Handle:
        """Block until `name` is bound to a live instance, for example across a restart.

        It wakes on every bind and unbind, so it sees the supervisor rebind the name.

        Args:
            name: the name to wait for.
            timeout: seconds to wait; None waits forever.

        Returns:
            The live instance.

        Raises:
            NoProcError: nothing live was bound to `name` within `timeout`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                handle = self._names.get(name)
                if handle is not None and is_alive(handle):
                    return handle
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    msg = f"no live instance was bound to {name!r} within {timeout} s"
                    raise NoProcError(msg)
                self._changed.wait(remaining)

    def names(self) -> list[str]:
        """The names bound to live instances, sorted."""
        with self._changed:
            items = list(self._names.items())
        return sorted(name for name, handle in items if is_alive(handle))
