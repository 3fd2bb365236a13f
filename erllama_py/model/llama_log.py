"""llama.cpp's log and abort hooks for a context worker process.

llama.cpp prints hundreds of INFO lines per model load to stderr. Calling
:func:`install` (idempotent; :class:`~erllama_py.model.llama_backend.LlamaBackend`
does it) routes llama.cpp's log through one ctypes callback that:

- drops everything below WARN (continuation records, level CONT, follow the
  level of the record they continue, so the progress dots of a load vanish too);
- forwards WARN and ERROR lines to the ``erllama_py.llama`` logger;
- keeps the last :data:`KEEP_LINES` WARN/ERROR lines in a ring buffer, and lets
  a :func:`capture` block collect the lines logged during it (a failed model
  load reports why through them).

It also installs a ``ggml_set_abort_callback`` hook: just before a
``GGML_ASSERT`` or ``GGML_ABORT`` kills the process, the message is written to
stderr on one line starting with :data:`ABORT_PREFIX`, so the supervisor of the
worker can say why it died. The hook replaces ggml's default, which prints a
backtrace by attaching gdb (slow and verbose); ``GGML_NO_BACKTRACE=1`` is set
too, for the C++ exceptions that escape llama.cpp's C API and end in
``std::terminate`` (their ``what()`` still reaches stderr).

Note the level numbering of this llama.cpp (ggml.h): NONE 0, DEBUG 1, INFO 2,
WARN 3, ERROR 4, CONT 5. llama-cpp-python's ``_logger`` module still assumes
the old order (INFO 1, WARN 2, ERROR 3).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp

__all__ = [
    "ABORT_PREFIX",
    "ggml_base_library",
    "KEEP_LINES",
    "LEVEL_DEBUG",
    "LEVEL_ERROR",
    "LEVEL_WARN",
    "LogCapture",
    "capture",
    "capture_stderr",
    "install",
    "recent",
]

LEVEL_DEBUG = 1
LEVEL_INFO = 2
LEVEL_WARN = 3
LEVEL_ERROR = 4
LEVEL_CONT = 5
KEEP_LINES = 64
ABORT_PREFIX = "erllama-py: llama.cpp aborted: "

logger = logging.getLogger("erllama_py.llama")
logger.addHandler(logging.NullHandler())

_lock = threading.Lock()
_recent: collections.deque[str] = collections.deque(maxlen=KEEP_LINES)
_captures: list[LogCapture] = []
# The ctypes callbacks must outlive every llama.cpp call: the module keeps them here.
_state: dict[str, Any] = {"last_level": LEVEL_INFO, "log_cb": None, "abort_cb": None}


class LogCapture:
    """Lines logged by llama.cpp while a :func:`capture` block ran (WARN and ERROR
    unless the block asked for a lower ``level``)."""

    def __init__(self, level: int = LEVEL_WARN) -> None:
        self.level = level
        self.lines: list[str] = []

    @property
    def last_error(self) -> str:
        """The most informative line: the first ERROR, else the last line, else ``""``.

        llama.cpp logs the root cause first and generic wrappers after it
        ("failed to load model"), so the first ERROR line says the most.
        """
        return self.lines[0] if self.lines else ""

    def summary(self, limit: int = 3) -> str:
        """Up to ``limit`` lines joined with ``"; "``."""
        return "; ".join(self.lines[:limit])


def _on_log(level: int, text: bytes | None, _user_data: Any) -> None:
    try:
        if level == LEVEL_CONT:
            level = _state["last_level"]
        else:
            _state["last_level"] = level
        if not text or (level < LEVEL_WARN and all(level < c.level for c in _captures)):
            return
        # One record is one message: some lack the trailing newline, so do not
        # join records (a CONT record is kept as its own line when its level passes).
        for raw in text.decode("utf-8", errors="replace").splitlines():
            line = raw.strip()
            if not line:
                continue
            with _lock:
                for cap in _captures:
                    if level >= cap.level:
                        cap.lines.append(line)
                if level < LEVEL_WARN:
                    continue
                _recent.append(line)
            logger.log(logging.ERROR if level >= LEVEL_ERROR else logging.WARNING, "%s", line)
    except Exception:  # never let an exception cross back into C
        pass


def _on_abort(message: bytes | None) -> None:
    try:
        msg = (message or b"").decode("utf-8", errors="replace").replace("\n", " ")
        os.write(2, (ABORT_PREFIX + msg + "\n").encode())
    except Exception:
        pass


def ggml_base_library() -> ctypes.CDLL:
    """The ``libggml-base`` instance that llama.cpp actually uses.

    The wheel ships *copies* (not symlinks) named ``libggml-base.so``,
    ``.so.0`` and ``.so.0.25.3``; libllama loads ``.so.0``. Opening another
    copy would load a second ggml whose hooks llama.cpp never calls, so the
    path is taken from ``/proc/self/maps`` once llama_cpp is imported.
    """
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            if Path(path).name.startswith("libggml-base.so"):
                return ctypes.CDLL(path)
    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so.0"))


def install() -> None:
    """Install the log and abort hooks (once per process; later calls do nothing)."""
    with _lock:
        if _state["log_cb"] is not None:
            return
        # ggml prints a backtrace on abort and on std::terminate by attaching gdb
        # when one is installed: half a second of ptrace and pages of noise
        # before a worker dies. The abort message itself is kept (below).
        os.environ.setdefault("GGML_NO_BACKTRACE", "1")
        log_cb = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(log_cb, ctypes.c_void_p(0))
        _state["log_cb"] = log_cb
        try:
            ggml = ggml_base_library()
            abort_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
            abort_cb = abort_type(_on_abort)
            ggml.ggml_set_abort_callback.argtypes = [abort_type]
            ggml.ggml_set_abort_callback.restype = ctypes.c_void_p
            ggml.ggml_set_abort_callback(abort_cb)
            _state["abort_cb"] = abort_cb
        except (OSError, AttributeError):  # older ggml without the hook: keep its default
            pass


@contextmanager
def capture(level: int = LEVEL_WARN) -> Iterator[LogCapture]:
    """Collect the lines of at least `level` (WARN) llama.cpp logs inside the block."""
    cap = LogCapture(level)
    with _lock:
        _captures.append(cap)
    try:
        yield cap
    finally:
        with _lock:
            _captures.remove(cap)


@contextmanager
def capture_stderr() -> Iterator[LogCapture]:
    """Redirect file descriptor 2 into a memfd inside the block and collect its lines.

    Some llama.cpp code writes to stderr directly instead of logging (the GBNF
    parser prints its errors with ``fprintf(stderr, ...)``). Anything else the
    process writes to stderr meanwhile is captured too: keep the block short.
    """
    cap = LogCapture()
    sys.stderr.flush()
    saved = os.dup(2)
    tmp = os.memfd_create("erllama-stderr", os.MFD_CLOEXEC)
    try:
        os.dup2(tmp, 2)
        try:
            yield cap
        finally:
            os.dup2(saved, 2)
        os.lseek(tmp, 0, os.SEEK_SET)
        with os.fdopen(os.dup(tmp), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        cap.lines.extend(ln.strip() for ln in text.splitlines() if ln.strip())
    finally:
        os.close(saved)
        os.close(tmp)


def recent() -> list[str]:
    """The last :data:`KEEP_LINES` WARN/ERROR lines llama.cpp logged in this process."""
    with _lock:
        return list(_recent)
