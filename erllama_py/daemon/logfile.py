"""The daemon's log: a size-rotated file that holds its logging records and, through file
descriptors 1 and 2, its prints and whatever C code writes there.

At each rotation the new file is ``dup2``-ed onto descriptors 1 and 2, so nothing keeps
writing into a rotated file.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

__all__ = ["DaemonLogHandler", "log_tail", "setup_daemon_log"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DaemonLogHandler(logging.handlers.RotatingFileHandler):
    """A `RotatingFileHandler` that also points stdout and stderr at the current file."""

    def redirect_std(self) -> None:
        if self.stream is None:
            self.stream = self._open()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        fd = self.stream.fileno()
        os.dup2(fd, 1)
        os.dup2(fd, 2)

    def doRollover(self) -> None:
        super().doRollover()
        self.redirect_std()


def setup_daemon_log(path: Path, max_bytes: int, backups: int) -> DaemonLogHandler:
    """Send the root logger (INFO and up) and descriptors 1 and 2 to the rotated log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = DaemonLogHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    handler.redirect_std()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return handler


def log_tail(path: Path, since: int = 0, lines: int = 20) -> list[str]:
    """The last `lines` lines of the log written after byte offset `since`."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = since if since <= size else 0  # rotated meanwhile: read the new file
            f.seek(max(start, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
