"""``erllama-py daemon start|stop|status|restart|logs``: the daemon from the outside.

`start` launches ``python -m erllama_py.cli serve --daemon`` detached (a new session,
stdin from /dev/null, stdout and stderr into the log) and returns once the daemon answers
``/health/ready``, or once it exits, printing the reason from its log. Exit statuses:
0 done, 1 failed (or already running), 3 not running (`status`, as init scripts do).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from erllama_py.config import Config
from erllama_py.daemon.control_client import ControlError, SocketControl
from erllama_py.daemon.http_client import HttpClientError, get_json
from erllama_py.daemon.logfile import log_tail
from erllama_py.daemon.messages import StatusReply, StatusRequest
from erllama_py.daemon.pidfile import DAEMON_FLAG, daemon_pid, read_pid
from erllama_py.daemon.units import format_size

__all__ = [
    "NOT_RUNNING",
    "format_status",
    "logs",
    "start",
    "status",
    "stop",
    "wait_gone",
]

NOT_RUNNING = 3
POLL_S = 0.1


def _err(message: str) -> None:
    print(f"erllama-py: {message}", file=sys.stderr, flush=True)


def _failure_reason(log: Path, since: int) -> str:
    tail = log_tail(log, since, lines=40)
    errors = [line for line in tail if line.startswith("erllama-py: ")]
    if errors:
        return errors[-1][len("erllama-py: ") :]
    return " | ".join(tail[-5:]) if tail else f"no output (see {log})"


def _remove_stale(config: Config) -> None:
    settings = config.daemon
    stale = read_pid(settings.pid_file)
    if settings.pid_file.exists() and daemon_pid(settings.pid_file) is None:
        settings.pid_file.unlink(missing_ok=True)
        print(f"removed a stale pid file ({settings.pid_file}, pid {stale})", flush=True)


def _ready_url(control: SocketControl, api_key: str | None) -> tuple[str | None, StatusReply]:
    reply = control.call(StatusRequest(), StatusReply)
    if not reply.ready or reply.url is None:
        return None, reply
    try:
        get_json(f"{reply.url}/health/ready", api_key, timeout=5.0)
    except HttpClientError:
        return None, reply
    return reply.url, reply


def start(config: Config, config_path: Path | None, timeout: float) -> int:
    """Start the daemon in the background; see the module docstring."""
    settings = config.daemon
    running = daemon_pid(settings.pid_file)
    if running is not None:
        _err(f"erllama-py is already running (pid {running}, pid file {settings.pid_file})")
        return 1
    _remove_stale(config)
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "erllama_py.cli", "serve", DAEMON_FLAG]
    if config_path is not None:
        command += ["--config", str(config_path.resolve())]
    with settings.log_file.open("ab") as log:
        since = log.tell()
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    print(f"starting erllama-py (pid {child.pid}, log {settings.log_file}) ...", flush=True)
    api_key = config.server.api_keys[0] if config.server.api_keys else None
    deadline = time.monotonic() + timeout
    shown = ""
    with SocketControl(settings.control_socket) as control:
        while time.monotonic() < deadline:
            code = child.poll()
            if code is not None:
                _err(f"the daemon exited ({code}): {_failure_reason(settings.log_file, since)}")
                return 1
            try:
                url, reply = _ready_url(control, api_key)
            except ControlError:
                time.sleep(POLL_S)
                continue
            if url is not None:
                print(f"erllama-py running (pid {reply.pid}) on {url}", flush=True)
                return 0
            progress = ", ".join(f"{m.name} {m.status}" for m in reply.models) or "starting"
            if progress != shown:
                print(f"loading models: {progress}", flush=True)
                shown = progress
            time.sleep(POLL_S)
    child.terminate()
    _err(f"the daemon was not ready within {timeout:g} s; stopped it (see {settings.log_file})")
    return 1


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until `pid` has exited (a zombie counts as exited); whether it did in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


def stop(config: Config, timeout: float) -> int:
    """SIGTERM the daemon, wait `timeout` for its graceful stop, then SIGKILL it."""
    settings = config.daemon
    pid = daemon_pid(settings.pid_file)
    if pid is None:
        _remove_stale(config)
        print("erllama-py is not running", flush=True)
        return 0
    print(f"stopping erllama-py (pid {pid}) ...", flush=True)
    os.kill(pid, signal.SIGTERM)
    if wait_gone(pid, timeout):
        how = "stopped"
    else:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10.0)
        how = f"killed (SIGKILL after {timeout:g} s)"
    if read_pid(settings.pid_file) == pid:
        settings.pid_file.unlink(missing_ok=True)
    settings.control_socket.unlink(missing_ok=True)
    print(f"erllama-py {how} (pid {pid})", flush=True)
    return 0


def _uptime(seconds: float) -> str:
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_status(reply: StatusReply) -> str:
    """The human form of a status."""
    lines = [
        f"erllama-py running, pid {reply.pid}, up {_uptime(reply.uptime_s)}",
        f"url: {reply.url} ({'ready' if reply.ready else 'not ready'})",
        "models:",
    ]
    for m in reply.models:
        lines.append(
            f"  {m.name}: {m.status}, {m.phase}, running {m.active}, queued {m.queued}, "
            f"worker pid {m.worker_pid} ({m.worker_state}, restarts {m.worker_restarts})"
        )
    if not reply.models:
        lines.append("  (none)")
    lines.append("cache:")
    for t in reply.tiers:
        lines.append(
            f"  {t.name} ({t.kind}): {t.rows} rows, "
            f"{format_size(t.bytes)} of {format_size(t.quota_bytes)}"
        )
    lines.append(f"worker restarts: {reply.worker_restarts}")
    return "\n".join(lines)


def status(config: Config, as_json: bool) -> int:
    """Print the daemon's status; 0 running, 3 not running."""
    settings = config.daemon
    pid = daemon_pid(settings.pid_file)
    if pid is None:
        if as_json:
            print(json.dumps({"running": False}))
        else:
            print("erllama-py is not running")
        return NOT_RUNNING
    try:
        with SocketControl(settings.control_socket) as control:
            reply = control.call(StatusRequest(), StatusReply)
    except ControlError as exc:
        if as_json:
            print(json.dumps({"running": True, "pid": pid, "error": str(exc)}))
        else:
            print(f"erllama-py running (pid {pid}), but its control socket fails: {exc}")
        return 0
    if as_json:
        print(json.dumps({"running": True, **reply.to_dict()}))
    else:
        print(format_status(reply))
    return 0


def logs(config: Config, lines: int, follow: bool) -> int:
    """Print the log's last `lines` lines; with `follow`, then what is appended, across
    rotations, until Ctrl-C."""
    path = config.daemon.log_file
    if not path.exists():
        _err(f"no log at {path}")
        return 1
    for line in log_tail(path, 0, lines):
        print(line, flush=True)
    if follow:
        with contextlib.suppress(KeyboardInterrupt):
            _follow(path)
    return 0


def _follow(path: Path) -> None:
    from_start = False
    while True:
        try:
            f = path.open("rb")
        except FileNotFoundError:
            time.sleep(0.25)
            continue
        with f:
            if not from_start:
                f.seek(0, os.SEEK_END)
            inode = os.fstat(f.fileno()).st_ino
            while True:
                chunk = f.read()
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                    sys.stdout.flush()
                    continue
                try:
                    if path.stat().st_ino != inode:
                        break  # rotated: read the new file from its start
                except FileNotFoundError:
                    break
                time.sleep(0.25)
        from_start = True
