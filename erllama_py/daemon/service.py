"""The daemon process itself: ``erllama-py serve --daemon`` as `erllama-py daemon start`
launches it, detached, in a session of its own.

It logs to the rotated log file, claims the pid file, serves HTTP as ``serve`` does, and
attaches the control socket under the runtime's root supervisor before the models load
(so ``status`` answers while they load). SIGTERM stops it gracefully (see
`erllama_py.server.serve`); the pid file and the socket are removed on the way out.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from erllama_py.config import load_config
from erllama_py.daemon.control_ops import Control
from erllama_py.daemon.control_server import control_child_spec
from erllama_py.daemon.logfile import setup_daemon_log
from erllama_py.daemon.pidfile import AlreadyRunningError, claim, release
from erllama_py.runtime import Runtime

__all__ = ["run_daemon"]

log = logging.getLogger("erllama_py.daemon")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stopping(signum: int) -> None:
    log.info("%s: stopping gracefully", signal.Signals(signum).name)
    # A second SIGTERM must not cut the shutdown saves short; SIGKILL is the last resort.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_daemon(config_path: Path | None, host: str | None = None, port: int | None = None) -> int:
    """Run the daemon in this process until SIGTERM; its exit status."""
    from erllama_py.server.serve import start_serving  # noqa: PLC0415 - the server's imports

    config = load_config(config_path)
    settings = config.daemon
    setup_daemon_log(settings.log_file, settings.log_max_bytes, settings.log_backups)
    pid = os.getpid()
    try:
        replaced = claim(settings.pid_file, pid)
    except AlreadyRunningError as exc:
        print(f"erllama-py: {exc}", file=sys.stderr)
        return 1
    if replaced is not None:
        log.info("replaced the stale pid file of pid %d", replaced)
    # Until the server waits for its signal, a SIGTERM unwinds the start (nothing is left).
    signal.signal(signal.SIGTERM, _interrupt)
    try:

        def attach_control(rt: Runtime, url: str) -> None:
            rt.attach(control_child_spec(Control(rt, lambda: url), settings.control_socket))

        print(f"erllama-py daemon pid {pid} starting (config {config_path})", flush=True)
        serving = start_serving(config, host=host, port=port, before_load=attach_control)
        print(f"erllama-py serving on {serving.url} (OpenAI API at {serving.url}/v1)", flush=True)
        try:
            serving.wait_for_signal(_stopping)
        finally:
            serving.stop()
        log.info("stopped")
    finally:
        release(settings.pid_file, pid)  # the control server removes its own socket
    return 0
