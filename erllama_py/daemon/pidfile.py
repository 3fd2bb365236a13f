"""The daemon's pid file: one line, the pid; claimed atomically, stale ones detected.

A pid file is stale when its process is gone, is a zombie, or is some other program that
got the pid (its command line is not an erllama-py daemon's).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

__all__ = ["DAEMON_FLAG", "AlreadyRunningError", "claim", "daemon_pid", "read_pid", "release"]

DAEMON_FLAG = "--daemon"  # on the command line of every daemon process


class AlreadyRunningError(Exception):
    """A live daemon holds the pid file."""

    def __init__(self, pid: int, path: Path) -> None:
        super().__init__(f"erllama-py is already running (pid {pid}, pid file {path})")
        self.pid = pid


def read_pid(path: Path) -> int | None:
    """The pid in the file, or None if there is no file or it does not hold a pid."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def is_daemon(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) erllama-py daemon process."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return DAEMON_FLAG in cmdline and any("erllama" in part for part in cmdline)


def daemon_pid(path: Path) -> int | None:
    """The pid of the live daemon the file names, None if none (absent or stale)."""
    pid = read_pid(path)
    return pid if pid is not None and is_daemon(pid) else None


def claim(path: Path, pid: int) -> int | None:
    """Write `pid` into the pid file, replacing a stale one.

    Returns:
        The stale file's pid if one was replaced, else None.

    Raises:
        AlreadyRunningError: a live daemon (not `pid`) holds the file.
        OSError: the folder cannot be created or written.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # often the socket's folder
    temp = path.with_name(f".{path.name}.{pid}")
    temp.write_text(f"{pid}\n", encoding="ascii")
    replaced: int | None = None
    try:
        for _attempt in range(3):
            try:
                os.link(temp, path)  # atomic: fails if another start got there first
                return replaced
            except FileExistsError:
                holder = read_pid(path)
                if holder is not None and holder != pid and is_daemon(holder):
                    raise AlreadyRunningError(holder, path) from None
                replaced = holder
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        raise AlreadyRunningError(read_pid(path) or 0, path)
    finally:
        temp.unlink(missing_ok=True)


def release(path: Path, pid: int) -> None:
    """Remove the pid file if it still names `pid`."""
    if read_pid(path) == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
