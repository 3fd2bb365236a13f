"""A duplex message channel between a parent and a process child."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Channel"]


class Channel:
    """One end of a Unix socket pair, carrying pickled messages and file descriptors.

    Messages are framed by `multiprocessing.connection.Connection` over a duplicate of the
    socket's descriptor; `socket` is the raw socket, for `socket.send_fds` and friends. The
    two share one byte stream: send descriptors only where the peer expects them (for
    example, send a message announcing them, then call `send_fds`). A channel is not safe
    for concurrent senders or concurrent receivers; guard it with a lock if you share it.

    When the peer process dies, `recv` raises `EOFError`; a child uses that to notice that its
    parent has gone.

    `close` may come from another thread (a supervisor handling the child's exit) while a
    call is under way: it shuts the socket down first, which ends a blocked read with EOF,
    then closes the descriptors only once no send or receive is inside them. Closing them
    under a running call would free their numbers for the next socket pair (the restarted
    child's), and that call would then read or write the successor's stream.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        """The raw socket, for passing descriptors with `socket.send_fds`."""
        self._connection = Connection(os.dup(sock.fileno()))
        self._reading = threading.Lock()
        self._writing = threading.Lock()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.socket.fileno()}"
        return f"<Channel {state}>"

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._connection.closed

    def send(self, obj: object) -> None:
        """Send a picklable object."""
        with self._writing:
            self._connection.send(obj)

    def recv(self) -> Any:
        """Receive one object, blocking until it arrives.

        Raises:
            EOFError: the peer closed its end (for example, it died) and nothing is left.
        """
        with self._reading:
            return self._connection.recv()

    def send_bytes(self, data: bytes) -> None:
        """Send one framed byte string."""
        with self._writing:
            self._connection.send_bytes(data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive one framed byte string (see `multiprocessing.connection.Connection`)."""
        with self._reading:
            return self._connection.recv_bytes(maxlength)

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Tell whether data is ready, waiting up to `timeout` seconds (None: forever)."""
        with self._reading:
            return self._connection.poll(timeout)

    def send_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Send raw bytes with file descriptors attached (SCM_RIGHTS)."""
        with self._writing:
            socket.send_fds(self.socket, [data], fds)

    def recv_fds(self, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
        """Receive raw bytes and the file descriptors attached to them."""
        with self._reading:
            data, fds, _flags, _address = socket.recv_fds(self.socket, bufsize, maxfds)
        return data, fds

    def fileno(self) -> int:
        """The descriptor of the message connection (for `select` and the like)."""
        return self._connection.fileno()

    def close(self) -> None:
        """Close this end. Idempotent; safe while another thread is in a call."""
        with contextlib.suppress(OSError):  # already closed, or the peer is gone
            self.socket.shutdown(socket.SHUT_RDWR)
        with self._reading, self._writing:
            if not self._connection.closed:
                self._connection.close()
            self.socket.close()
