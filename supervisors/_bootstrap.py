"""The child side of `ProcessChild.spawn`: runs in a fresh interpreter.

The parent starts ``python -c BOOTSTRAP`` with one end of a socket pair passed as an inherited
descriptor. On that channel the child reads, in order:

1. the parent's ``sys.path`` (plain strings), installed before anything else is imported, so
   the child imports the same packages, this one included;
2. ``(target, pickled_args, parent_pid)`` where target is ``"package.module:qualname"``.

It then asks the kernel to SIGKILL it when the parent goes (Linux, best effort), imports the
target's module by name (never the parent's ``__main__``), calls ``target(channel, *args)`` and
exits 0 when it returns, 1 with the traceback on stderr when it raises, or the code of a
`SystemExit`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import pickle
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from supervisors._channel import Channel

__all__ = ["BOOTSTRAP", "main", "resolve_target"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

BOOTSTRAP = (
    "import os, sys\n"
    "from multiprocessing.connection import Connection\n"
    "boot = Connection(os.dup({fd}))\n"
    "sys.path[:] = boot.recv()\n"
    "from supervisors._bootstrap import main\n"
    "main({fd}, boot)\n"
)
"""The ``-c`` program; ``{fd}`` is the inherited descriptor of the child's channel."""


def resolve_target(reference: str) -> Any:
    """Import ``"package.module:qualname"`` and return the object it names."""
    module_name, _, qualname = reference.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        # Best effort: the signal fires when the parent's spawning thread exits, which is why
        # the parent spawns from one long-lived thread.
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        # The parent died before prctl took effect.
        os._exit(1)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main(fd: int, boot: Connection) -> NoReturn:
    """Run the target named on the boot connection, then exit the interpreter."""
    code = 1
    try:
        reference, payload, parent_pid = boot.recv()
        boot.close()
        _die_with_parent(parent_pid)
        target = resolve_target(reference)
        args = pickle.loads(payload)
        channel = Channel(socket.socket(fileno=fd))
        target(channel, *args)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # the child reports every failure the same way
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)
