"""Clients of the control requests: over the daemon's socket, or on an embedded runtime.

Both have `call(request, expected)`, which returns the reply if it is of the `expected`
type and raises `ControlError` for an `ErrorReply`, so the REPL and the CLI are written
once for both.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import Protocol, TypeVar

from erllama_py.daemon.control_ops import Control
from erllama_py.daemon.messages import (
    ErrorReply,
    ProtocolError,
    Reply,
    Request,
    recv_message,
    send_message,
)
from erllama_py.runtime import Runtime

__all__ = [
    "ControlChannel",
    "ControlError",
    "DaemonNotRunningError",
    "LocalControl",
    "SocketControl",
    "checked",
]

R = TypeVar("R", bound=Reply)
CONNECT_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 300.0  # a restart waits for a model to load


class ControlError(Exception):
    """The daemon refused or failed a request; `kind` is its error's class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class DaemonNotRunningError(ControlError):
    """Nothing listens on the control socket."""


def checked(reply: Reply, expected: type[R]) -> R:
    """`reply` as `expected`, or `ControlError` for an error or an unexpected reply."""
    if isinstance(reply, ErrorReply):
        raise ControlError(reply.kind, reply.message)
    if not isinstance(reply, expected):
        raise ControlError("ProtocolError", f"expected {expected.__name__}, got {reply.tag}")
    return reply


class ControlChannel(Protocol):
    """Something that answers control requests."""

    def call(self, request: Request, expected: type[R]) -> R: ...

    def describe(self) -> str: ...


class LocalControl:
    """Control requests on a runtime in this process (`erllama_py.repl.embed`)."""

    def __init__(self, runtime: Runtime, url: str | None = None) -> None:
        self._control = Control(runtime, lambda: url)

    def call(self, request: Request, expected: type[R]) -> R:
        return checked(self._control.handle(request), expected)

    def describe(self) -> str:
        return f"the embedded runtime (pid {self._control.status().pid})"


class SocketControl:
    """Control requests over the daemon's Unix socket (one connection, reused).

    Raises (from `call`):
        DaemonNotRunningError: nothing listens at `path`.
        ControlError: the daemon refused the request (another uid) or it failed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"the daemon at {self.path}"

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_TIMEOUT_S)
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                raise DaemonNotRunningError(
                    "DaemonNotRunning", f"no daemon listens on {self.path}"
                ) from exc
            except OSError as exc:
                sock.close()
                raise ControlError(type(exc).__name__, f"{self.path}: {exc.strerror}") from exc
            sock.settimeout(CALL_TIMEOUT_S)
            self._sock = sock
        return self._sock

    def call(self, request: Request, expected: type[R]) -> R:
        with self._lock:
            sock = self._connect()
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    send_message(sock, request)  # a refused peer may be hung up on first
                reply = recv_message(sock)
            except (OSError, ProtocolError) as exc:
                self.close()
                raise ControlError(type(exc).__name__, f"the control socket: {exc}") from exc
            if reply is None:
                self.close()
                raise ControlError("ConnectionClosed", "the daemon closed the connection")
            if not isinstance(reply, Reply):
                self.close()
                raise ControlError("ProtocolError", "the daemon sent a request")
            if isinstance(reply, ErrorReply) and reply.kind in ("PermissionError", "ProtocolError"):
                self.close()  # the daemon hangs up after these
            return checked(reply, expected)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SocketControl:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
