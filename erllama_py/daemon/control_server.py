"""The control socket, as a child of the runtime's root supervisor (``control``).

A Unix stream socket, owner-only: its folder is 0700 and owned by the daemon's user
(created so when missing, refused otherwise), the socket file is 0600. Each connection's
peer credentials (``SO_PEERCRED``) are checked: a peer of another uid gets one
`ErrorReply` and is disconnected, whatever the file modes allowed. Each connection is
served on a thread of its own, one request at a time (see `messages` for the framing).

If the accept thread ends while the actor did not ask it to, the actor fails and its
supervisor starts a new one on the same path, as it would any child.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import pykka

from erllama_py.daemon.control_ops import Control
from erllama_py.daemon.messages import (
    ErrorReply,
    ProtocolError,
    Request,
    recv_message,
    send_message,
)
from erllama_py.errors import ConfigError
from supervisors import ChildSpec, SupervisedActor

__all__ = [
    "CONTROL_NAME",
    "ControlServer",
    "Peer",
    "bind_control_socket",
    "control_child_spec",
    "peer_credentials",
    "peer_refusal",
]

log = logging.getLogger("erllama_py.daemon")
CONTROL_NAME = "control"
_KEY = "daemon.control_socket"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a Unix socket, as the kernel saw it connect."""

    pid: int
    uid: int
    gid: int


def peer_credentials(conn: socket.socket) -> Peer:
    """The peer's credentials (``SO_PEERCRED``)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


def peer_refusal(peer: Peer, uid: int) -> str | None:
    """Why `peer` may not use a daemon running as `uid` (None: it may)."""
    if peer.uid != uid:
        return f"peer uid {peer.uid} (pid {peer.pid}) is not the daemon's uid {uid}"
    return None


def _owner_only_folder(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as exc:
        raise ConfigError(_KEY, f"cannot create {folder}: {exc.strerror}") from exc
    if info.st_uid != os.getuid():
        raise ConfigError(_KEY, f"the folder {folder} belongs to uid {info.st_uid}, not to us")
    if stat.S_IMODE(info.st_mode) & 0o077:
        mode = oct(stat.S_IMODE(info.st_mode))
        raise ConfigError(_KEY, f"the folder {folder} must be owner-only (0700), it is {mode}")


def _clear_stale(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ConfigError(_KEY, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: left by a daemon that was killed
        return
    finally:
        probe.close()
    raise ConfigError(_KEY, f"{path} is in use by another daemon")


def bind_control_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600, in an owner-only folder.

    Raises:
        ConfigError: the folder is not owner-only, or the path is in use or not bindable.
    """
    _owner_only_folder(path.parent)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(_KEY, f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


@dataclass(frozen=True)
class _AcceptDied:
    """The accept thread ended on its own."""


class ControlServer(SupervisedActor):
    """See the module docstring."""

    def __init__(self, control: Control, path: Path, sock: socket.socket) -> None:
        super().__init__()
        self._control = control
        self._path = path
        self._sock = sock
        self._stopping = False
        self._thread: threading.Thread | None = None

    def on_start(self) -> None:
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"control {self._path}", daemon=True
        )
        self._thread.start()
        log.info("control socket on %s", self._path)

    def _accept_loop(self) -> None:
        try:
            while True:
                try:
                    conn, _ = self._sock.accept()
                except OSError as exc:
                    if self._stopping or exc.errno in (errno.EBADF, errno.EINVAL):
                        return
                    raise
                threading.Thread(
                    target=self._serve, args=(conn,), name="control connection", daemon=True
                ).start()
        except BaseException:
            log.exception("the control socket's accept loop crashed")
        finally:
            if not self._stopping:
                with contextlib.suppress(pykka.ActorDeadError):
                    self.actor_ref.tell(_AcceptDied())

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                peer = peer_credentials(conn)
                refusal = peer_refusal(peer, os.getuid())
                if refusal is not None:
                    log.warning("control socket: refused %s", refusal)
                    send_message(conn, ErrorReply("PermissionError", refusal))
                    return
                while True:
                    try:
                        request = recv_message(conn)
                    except ProtocolError as exc:
                        send_message(conn, ErrorReply("ProtocolError", str(exc)))
                        return
                    if request is None:
                        return
                    if not isinstance(request, Request):
                        send_message(conn, ErrorReply("ProtocolError", "expected a request"))
                        return
                    try:
                        reply = self._control.handle(request)
                    except Exception as exc:  # a bug: say so to the client, keep serving
                        log.exception("control request %r failed", request)
                        reply = ErrorReply("InternalError", f"{type(exc).__name__}: {exc}")
                    send_message(conn, reply)
            except OSError:
                return  # the client went away

    def on_receive(self, message: object) -> object:
        if isinstance(message, _AcceptDied):
            raise RuntimeError(f"the control socket on {self._path} stopped accepting")
        return super().on_receive(message)

    def on_stop(self) -> None:
        self._close()

    def on_failure(self, *_exc_info: object) -> None:
        self._close()

    def _close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with contextlib.suppress(OSError):
            self._path.unlink()


def control_child_spec(control: Control, path: Path) -> ChildSpec:
    """The child spec of the control socket (bound in the start, so a bad path fails it)."""

    def start() -> pykka.ActorRef[ControlServer]:
        sock = bind_control_socket(path)
        try:
            return ControlServer.start(control, path, sock)
        except BaseException:
            sock.close()
            raise

    return ChildSpec(id=CONTROL_NAME, start=start, name=CONTROL_NAME, shutdown=10.0)
