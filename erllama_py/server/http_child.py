"""The HTTP server as a child of the runtime's root supervisor.

`HttpServer` is an actor that owns a listening socket and a uvicorn server
running the app in a thread of its own. If that thread ends while the actor
did not ask it to (uvicorn crashed), the actor fails and its supervisor starts
a new one on the same address, as it would any child; the tree shows it as
``http``. Stopping it is graceful: the socket stops accepting, running
requests get ``shutdown_timeout_s`` to finish, then uvicorn cancels them (their
requests end, and what they computed is saved).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pykka
import uvicorn
from fastapi import FastAPI

from erllama_py.config import ServerSettings
from erllama_py.errors import ConfigError
from supervisors import ChildSpec, SupervisedActor

__all__ = ["HTTP_NAME", "Address", "HttpServer", "bind_socket", "http_child_spec"]

log = logging.getLogger("erllama_py.server")
HTTP_NAME = "http"
START_TIMEOUT_S = 30.0


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one.

    Raises:
        ConfigError: the address is in use or cannot be bound (``server.port``/``host``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it Nagle holds a response's body (or the next SSE frame) behind its
    # headers until the client's delayed ACK, some 40 ms later.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        key = "server.port" if exc.errno == errno.EADDRINUSE else "server.host"
        raise ConfigError(key, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class _ServerDied:
    """The uvicorn thread ended on its own."""


class Address:
    """Where the server listens; a restarted server keeps the port its first one got."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"


class HttpServer(SupervisedActor):
    """See the module docstring. Its address is ``url`` once started."""

    def __init__(
        self,
        app_factory: Callable[[], FastAPI],
        settings: ServerSettings,
        address: Address,
        sock: socket.socket,
    ) -> None:
        super().__init__()
        self._factory = app_factory
        self._settings = settings
        self._address = address
        self._sock: socket.socket | None = sock
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.url = ""

    def on_start(self) -> None:
        self.url = self._address.url
        config = uvicorn.Config(
            self._factory(),
            log_config=None,
            access_log=False,  # our middleware writes the access log, with request ids
            lifespan="off",
            # The runtime ends the requests still running at shutdown_timeout_s (saving
            # them); uvicorn's own deadline, later, only catches what that leaves.
            timeout_graceful_shutdown=round(self._settings.shutdown_timeout_s) + 10,
            timeout_keep_alive=30,
            # The same event loop whatever else is installed (Ray's extra brings uvloop):
            # uvloop swallows an exception raised in a callback, so a crash of the HTTP
            # layer would no longer reach its supervisor; asyncio also sets TCP_NODELAY.
            loop="asyncio",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"http {self.url}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._close_socket()
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        log.info("serving on %s", self.url)

    def _run(self) -> None:
        assert self._server is not None
        assert self._sock is not None
        try:
            self._server.run(sockets=[self._sock])
        except BaseException:
            log.exception("the HTTP server crashed")
        finally:
            if not self._stopping:
                with contextlib.suppress(Exception):
                    self.actor_ref.tell(_ServerDied())

    def on_receive(self, message: object) -> object:
        if isinstance(message, _ServerDied):
            raise RuntimeError(f"the HTTP server on {self.url} stopped on its own")
        return super().on_receive(message)

    def address(self) -> str:
        """The URL it serves on (``http://127.0.0.1:8080``)."""
        return self.url

    def begin_shutdown(self) -> None:
        """Stop accepting connections; those open are served until they end."""
        self._stopping = True
        if self._server is not None:
            self._server.should_exit = True

    def on_stop(self) -> None:
        self._shutdown()

    def on_failure(self, *_exc_info: object) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self._settings.shutdown_timeout_s + 10.0)
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def http_child_spec(
    app_factory: Callable[[], FastAPI], settings: ServerSettings, address: Address
) -> ChildSpec:
    """The child spec of the HTTP server (its shutdown waits for the graceful stop)."""

    def start() -> pykka.ActorRef[HttpServer]:
        # Bound here, in the supervisor's start, so that an address in use fails the
        # start itself (a clear error) rather than the actor, again and again.
        sock = bind_socket(address.host, address.port)
        address.port = int(sock.getsockname()[1])
        try:
            return HttpServer.start(app_factory, settings, address, sock)
        except BaseException:
            sock.close()
            raise

    return ChildSpec(
        id=HTTP_NAME,
        start=start,
        name=HTTP_NAME,
        shutdown=settings.shutdown_timeout_s + 15.0,
    )
