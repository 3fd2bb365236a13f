"""One runtime per tier root: an advisory lock held for the cache's whole life.

Two runtimes on one disk root would each enforce the whole quota and delete
each other's files, so the first holds ``fcntl.flock`` on ``<root>/.erllama.lock``
(which holds its pid, for the error the second one gets) until it stops. The
kernel releases the lock when the holder dies, however it dies, so a crashed
runtime never blocks the next one. ``flock`` locks belong to an open file, so a
second runtime in the same process is refused too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from erllama_py.config import CacheSettings
from erllama_py.errors import ConfigError

__all__ = ["LOCK_NAME", "RootLocks"]

LOCK_NAME = ".erllama.lock"


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
        if text:
            return f"pid {int(text)}"
    return "an unknown process"


class RootLocks:
    """The locks of every file tier root of one cache (see the module docstring)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    @property
    def held(self) -> tuple[Path, ...]:
        return tuple(self._fds)

    def acquire(self, cache: CacheSettings) -> None:
        """Lock every file tier's root (idempotent: a restarted cache keeps its locks).

        Raises:
            ConfigError: a root is in use by another runtime (naming the root and the
                holder's pid), or its lock file cannot be opened. No lock is kept then.
        """
        try:
            for i, tier in enumerate(cache.tiers):
                if tier.root is None or tier.root in self._fds:
                    continue
                self._fds[tier.root] = self._lock(tier.root, f"cache.tiers[{i}].root")
        except BaseException:
            self.release()
            raise

    def _lock(self, root: Path, key: str) -> int:
        path = root / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(key, f"cannot open {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                key,
                f"{root} is in use by another erllama-py runtime ({holder}); "
                "stop it or give this one another root",
            ) from None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(key, f"cannot lock {path}: {exc.strerror or exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd

    def release(self) -> None:
        """Unlock every root (closing the descriptor releases the lock)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:  # a cache dropped without stop() must not pin its roots
        self.release()
