"""Monitors: event-driven death detection for one child instance.

An actor is watched by a daemon thread that joins the actor's own thread, so the exit is
reported once `on_failure` or `on_stop` has finished and the reason is final (a restart never
overlaps the old instance's cleanup). A process is watched through its reaper thread's exit
callback. Neither polls: the report follows the death by the time a thread takes to wake.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pykka

from supervisors._actor import ExitRecord, exit_record_of
from supervisors._process import ProcessChild
from supervisors._reason import KILLED, NOPROC, NORMAL, ProcessExit
from supervisors._types import Handle

__all__ = ["Monitor", "find_actor_thread"]


def find_actor_thread(actor: pykka.Actor) -> threading.Thread | None:
    """Find the thread running `actor`'s loop.

    `pykka.ThreadingActor` does not keep its thread, so look for the one whose target is
    the actor's bound `_actor_loop` (CPython keeps a thread's target until it returns).
    """
    for thread in threading.enumerate():
        target = getattr(thread, "_target", None)
        if getattr(target, "__self__", None) is actor:
            return thread
    return None


class Monitor:
    """Watches one instance of a child and reports its exit reason once.

    Args:
        handle: the instance to watch.
        notify: called with the exit reason, on a watcher thread, unless `cancel` was
            called first.
    """

    def __init__(self, handle: Handle, notify: Callable[[object], None]) -> None:
        self.handle = handle
        self._notify = notify
        self._lock = threading.Lock()
        self._cancelled = False
        self._done = threading.Event()
        self._reason: object = None
        self._record: ExitRecord | None = None
        self._actor: pykka.Actor | None = None
        self.thread: threading.Thread | None = None
        """The actor's thread (None for a process, or if it could not be found)."""
        if isinstance(handle, ProcessChild):
            handle.add_done_callback(self._on_process_exit)
            return
        actor = handle._actor_weakref()
        if actor is None:
            self._finish(NOPROC)
            return
        self._record = exit_record_of(actor)
        self._actor = actor
        self.thread = find_actor_thread(actor)
        threading.Thread(
            target=self._watch_actor,
            args=(handle,),
            name=f"supervisors-watch-{self.thread.name if self.thread else handle.actor_urn}",
            daemon=True,
        ).start()

    @property
    def thread_name(self) -> str | None:
        """The name of the actor's thread, if known."""
        return self.thread.name if self.thread is not None else None

    @property
    def reason(self) -> object:
        """The exit reason once `wait` has returned True, else None."""
        return self._reason

    def cancel(self) -> None:
        """Stop reporting: the supervisor is terminating this instance itself."""
        with self._lock:
            self._cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (None: forever) for the exit; True once it happened."""
        return self._done.wait(timeout)

    def mark_killed(self) -> None:
        """Record ``"killed"`` as the actor's reason before a kill is attempted."""
        if self._record is not None:
            self._record.record(KILLED)

    def _watch_actor(self, ref: pykka.ActorRef[pykka.Actor]) -> None:
        if self.thread is not None:
            self.thread.join()
        else:
            ref.actor_stopped.wait()
        actor, self._actor = self._actor, None
        if actor is not None and self.thread is not None:
            if not ref.actor_stopped.is_set():
                # An injected kill landed outside Pykka's handlers (say, while the actor
                # waited for a message): the thread died without Pykka's cleanup. Do it.
                assert self._record is not None
                self._record.record(KILLED)
                pykka.ActorRegistry.unregister(ref)
                actor.actor_stopped.set()
            # Answer callers whose messages arrived as the actor died.
            actor._actor_loop_teardown()
        record = self._record
        self._finish(record.reason if record is not None and record.recorded else NOPROC)

    def _on_process_exit(self, process: ProcessChild) -> None:
        code = process.exitcode
        self._finish(NORMAL if code == 0 else ProcessExit(code if code is not None else -1))

    def _finish(self, reason: object) -> None:
        self._reason = reason
        self._done.set()
        with self._lock:
            cancelled = self._cancelled
        if not cancelled:
            self._notify(reason)
