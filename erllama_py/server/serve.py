"""``erllama-py serve``: the runtime and its HTTP server, in the foreground.

The server starts first (``/health`` answers, ``/health/ready`` says 503), then
the configured models load. SIGTERM or Ctrl-C stops it gracefully: the server
stops accepting, running requests get ``server.shutdown_timeout_s`` to finish
and are then cancelled, the models unload (their requests in flight are saved,
reason ``shutdown``), saves complete, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import pykka

from erllama_py.config import Config
from erllama_py.errors import ErllamaError
from erllama_py.runtime import Runtime, start
from erllama_py.server.app import create_app
from erllama_py.server.http_child import HTTP_NAME, Address, http_child_spec
from erllama_py.server.metrics import Metrics

__all__ = ["Serving", "start_serving"]


class Serving:
    """A runtime with its HTTP server attached; `stop` ends both, gracefully."""

    def __init__(self, runtime: Runtime, address: Address) -> None:
        self.runtime = runtime
        self.address = address

    @property
    def url(self) -> str:
        return self.address.url

    def stop(self) -> None:
        """Stop gracefully: the server stops accepting connections, running requests get
        ``shutdown_timeout_s`` to finish, then the runtime stops: the models unload,
        saving what is still running (reason ``shutdown``), which ends those requests,
        and the server's last connections close."""
        rt = self.runtime
        if rt.stopped:
            return
        try:
            http = rt.registry.whereis(HTTP_NAME)
            if isinstance(http, pykka.ActorRef):
                with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                    http.proxy().begin_shutdown().get(timeout=10.0)
            deadline = time.monotonic() + rt.config.server.shutdown_timeout_s
            while time.monotonic() < deadline and _busy(rt):
                time.sleep(0.05)
        finally:
            rt.stop()

    def wait_for_signal(self, on_signal: Callable[[int], None] | None = None) -> int:
        """Block until SIGTERM or SIGINT (main thread only); returns the signal number."""
        got: list[int] = []
        done = threading.Event()

        def handler(signum: int, _frame: FrameType | None) -> None:
            got.append(signum)
            done.set()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not done.wait(0.5):
                pass
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        if on_signal is not None:
            on_signal(got[0])
        return got[0]


def _busy(rt: Runtime) -> bool:
    try:
        return any(m.active or m.pending_len for m in rt.models())
    except ErllamaError:
        return False


def start_serving(
    config: Config, *, host: str | None = None, port: int | None = None,
    on_listening: Callable[[str], None] | None = None,
    before_load: Callable[[Runtime, str], None] | None = None,
) -> Serving:  # fmt: skip
    """Start the runtime, attach the HTTP server, then load the configured models.

    `before_load(runtime, url)` runs once the server listens, before the models load (the
    daemon attaches its control socket there).

    Raises:
        ConfigError: a bad configuration, or an address that cannot be bound.
        ModelLoadError: a configured model cannot be loaded (nothing is left running).
    """
    settings = config.server
    if host is not None or port is not None:
        settings = dataclasses.replace(
            settings,
            host=settings.host if host is None else host,
            port=settings.port if port is None else port,
        )
        config = dataclasses.replace(config, server=settings)
    rt = start(config, load_models=False)
    try:
        metrics = Metrics(rt)
        address = Address(settings.host, settings.port)
        rt.attach(http_child_spec(lambda: create_app(rt, settings, metrics), settings, address))
        if on_listening is not None:
            on_listening(address.url)
        if before_load is not None:
            before_load(rt, address.url)
        rt.load_configured_models()
    except BaseException:
        rt.stop()
        raise
    return Serving(rt, address)
