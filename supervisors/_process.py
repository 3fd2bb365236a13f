"""OS process children: a fresh interpreter per child, watched by a reaper thread.

A child is started with ``subprocess.Popen([sys.executable, "-c", BOOTSTRAP])``: never a fork
(the runtime has threads, and a forked child inherits their locks in whatever state they
were) and never `multiprocessing`'s spawn (it re-imports the parent's ``__main__``, so a
script without an ``if __name__ == "__main__"`` guard would run again in every child). The
target is imported by module name; a target defined in ``__main__`` is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from supervisors._bootstrap import BOOTSTRAP
from supervisors._channel import Channel
from supervisors._reason import signal_name

__all__ = ["ProcessChild", "target_reference"]

logger = logging.getLogger("supervisors")

T = TypeVar("T")


def target_reference(target: Callable[..., object] | str) -> str:
    """Return the ``"package.module:qualname"`` a fresh interpreter imports `target` by.

    Raises:
        ValueError: `target` is defined in ``__main__``, nested in a function, a lambda, or a
            malformed string.
        TypeError: `target` is neither a string nor a named module-level callable.
    """
    if isinstance(target, str):
        module, sep, qualname = target.partition(":")
        if not sep or not module or not qualname:
            msg = f"target must be 'package.module:function', got {target!r}"
            raise ValueError(msg)
    else:
        module_attr = getattr(target, "__module__", None)
        qualname_attr = getattr(target, "__qualname__", None)
        if not isinstance(module_attr, str) or not isinstance(qualname_attr, str):
            msg = (
                "target must be a module-level function or a 'package.module:function' "
                f"string, got {target!r}"
            )
            raise TypeError(msg)
        module, qualname = module_attr, qualname_attr
    if module == "__main__":
        msg = (
            f"target {qualname!r} is defined in __main__, which the child's fresh interpreter "
            "does not import (that is what keeps an unguarded script from running twice); "
            "move it to an importable module, or pass 'package.module:function'"
        )
        raise ValueError(msg)
    if "<" in qualname:
        msg = (
            f"target {qualname!r} is a lambda or is nested in a function; a fresh "
            "interpreter can only import module-level functions"
        )
        raise ValueError(msg)
    return f"{module}:{qualname}"


class _Spawner:
    """Runs every Popen on one long-lived daemon thread.

    Linux's PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the
    process: a child spawned from a short-lived thread would be killed with that thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]
        self._requests = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], T]) -> T:
        future: Future[T] = Future()
        with self._lock:
            # is_alive: after a fork, the child inherits the object but not the thread.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="supervisors-spawner", daemon=True
                )
                self._thread.start()
        self._requests.put((fn, future))
        return future.result()

    def _run(self) -> None:
        while True:
            fn, future = self._requests.get()
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)


_spawner = _Spawner()


class ProcessChild:
    """A handle on a child OS process running a Python function in a fresh interpreter.

    Start one with `ProcessChild.spawn`. A daemon reaper thread waits for the process, so
    `alive`, `exitcode` and `wait` are event-driven and thread-safe.

    When a supervisor owns the child, it closes `channel` once it has handled the child's
    exit; a reader then gets `EOFError` (the peer is gone) or `OSError` (closed here).
    """

    def __init__(self, popen: subprocess.Popen[bytes], channel: Channel, name: str) -> None:
        """Wrap a started process; use `ProcessChild.spawn` instead."""
        self._popen = popen
        self.channel = channel
        """The parent's end of the duplex channel to the child."""
        self.name = name
        """A label for logs and snapshots."""
        self._exited = threading.Event()
        self._callbacks: list[Callable[[ProcessChild], None]] = []
        self._lock = threading.Lock()
        self._reaper = threading.Thread(
            target=self._reap, name=f"supervisors-reaper-{popen.pid}", daemon=True
        )
        self._reaper.start()

    @classmethod
    def spawn(
        cls,
        target: Callable[..., object] | str,
        /,
        *args: object,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> ProcessChild:
        """Start ``target(channel, *args)`` in a fresh Python interpreter.

        Behind the call:

        1. `target` is turned into ``"package.module:function"`` (refused if it lives in
           ``__main__``) and `args` are pickled, so errors surface here, in the parent;
        2. a socket pair is made, and ``python -c BOOTSTRAP`` is started with one end
           inherited (no fork of this process, no `multiprocessing`);
        3. the parent's ``sys.path``, then the target and the pickled args, are sent over the
           channel: nothing of them is on the command line;
        4. the child sets PR_SET_PDEATHSIG to SIGKILL (Linux, best effort; it also sees EOF on
           its channel when the parent dies), imports the target's module by name and calls
           it. It exits 0 when the target returns, 1 when it raises (the traceback goes to
           stderr), or with the code of a `SystemExit`.

        Args:
            target: a module-level function (not from ``__main__``) or a
                ``"package.module:function"`` string; the string form does not import the
                module in the parent.
            *args: picklable arguments passed after the channel.
            env: the child's environment; None inherits the parent's.
            name: a label for logs; defaults to the target's reference.

        Returns:
            The handle. The process may still be starting when it returns.

        Raises:
            ValueError: see `target_reference`.
            TypeError: see `target_reference`.
            pickle.PicklingError: an argument cannot be pickled.
            OSError: the interpreter could not be started.
        """
        reference = target_reference(target)
        payload = pickle.dumps(args)
        parent_sock, child_sock = socket.socketpair()
        try:
            child_fd = child_sock.fileno()
            popen = _spawner.call(
                lambda: subprocess.Popen(
                    [sys.executable, "-c", BOOTSTRAP.format(fd=child_fd)],
                    pass_fds=(child_fd,),
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        channel = Channel(parent_sock)
        # A child that died at once shows up through its exit code, not here.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            channel.send(list(sys.path))
            channel.send((reference, payload, os.getpid()))
        return cls(popen, channel, name or reference)

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.exitcode}"
        return f"<ProcessChild {self.name} pid={self.pid} {state}>"

    @property
    def pid(self) -> int:
        """The process id."""
        return self._popen.pid

    @property
    def socket(self) -> socket.socket:
        """The raw socket of `channel`, for `socket.send_fds`."""
        return self.channel.socket

    @property
    def alive(self) -> bool:
        """Whether the process has not yet been reaped."""
        return not self._exited.is_set()

    @property
    def exitcode(self) -> int | None:
        """The exit code once reaped (negative: killed by that signal), else None."""
        return self._popen.returncode if self._exited.is_set() else None

    @property
    def signal(self) -> str | None:
        """The name of the signal that killed the process (``"SIGKILL"``), else None."""
        return signal_name(self.exitcode)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to `timeout` seconds (None: forever) for the process to end.

        Returns:
            The exit code, or None if it is still running.
        """
        self._exited.wait(timeout)
        return self.exitcode

    def send_signal(self, signum: int) -> None:
        """Send a signal, unless the process has already been reaped."""
        self._popen.send_signal(signum)

    def terminate(self) -> None:
        """Send SIGTERM."""
        self._popen.terminate()

    def kill(self) -> None:
        """Send SIGKILL."""
        self._popen.kill()

    def close(self) -> None:
        """Close the parent's end of the channel. Idempotent."""
        self.channel.close()

    def add_done_callback(self, fn: Callable[[ProcessChild], None]) -> None:
        """Call ``fn(self)`` once the process has been reaped.

        It runs on the reaper thread, or at once on this thread if the process is already
        gone. Keep it short; exceptions are logged and dropped.
        """
        with self._lock:
            if not self._exited.is_set():
                self._callbacks.append(fn)
                return
        self._run_callback(fn)

    def _reap(self) -> None:
        self._popen.wait()
        with self._lock:
            self._exited.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._run_callback(fn)

    def _run_callback(self, fn: Callable[[ProcessChild], None]) -> None:
        try:
            fn(self)
        except Exception:
            logger.exception("exit callback of %r failed", self)
