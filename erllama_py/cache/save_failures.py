"""Why a save failed, counted by cause and logged once per cause.

A failed save never fails a request or a model: whatever goes wrong on the
save path (no descriptors, no memory for the state, a full, read-only or
vanished tier root, an I/O error) drops that one save. Each drop is counted
under its cause (``save_failed_<cause>`` in `rt.counters()`, besides
``saves_dropped``) and logged at WARNING the first time its cause is seen in
a runtime, at DEBUG after that, so a full disk does not write a line per
request.
"""

from __future__ import annotations

import errno
import logging
from enum import StrEnum

from erllama_py.cache.counters import Counters

__all__ = ["SaveFailure", "classify", "note_save_failure"]

log = logging.getLogger("erllama_py.cache")


class SaveFailure(StrEnum):
    """The cause of a dropped save; its counter is ``save_failed_<value>``."""

    NO_DESCRIPTORS = "no_descriptors"  # EMFILE, ENFILE
    NO_MEMORY = "no_memory"  # ENOMEM: no shared memory (or arena room) for the state
    NO_SPACE = "no_space"  # ENOSPC, EDQUOT
    NOT_WRITABLE = "not_writable"  # EROFS, EACCES, EPERM: a read-only or forbidden root
    ROOT_MISSING = "root_missing"  # ENOENT, ENOTDIR: the tier's folder went away
    IO_ERROR = "io_error"  # EIO and anything else

    @property
    def counter(self) -> str:
        return f"save_failed_{self.value}"


_BY_ERRNO: dict[int, SaveFailure] = {
    errno.EMFILE: SaveFailure.NO_DESCRIPTORS,
    errno.ENFILE: SaveFailure.NO_DESCRIPTORS,
    errno.ENOMEM: SaveFailure.NO_MEMORY,
    errno.ENOSPC: SaveFailure.NO_SPACE,
    errno.EDQUOT: SaveFailure.NO_SPACE,
    errno.EROFS: SaveFailure.NOT_WRITABLE,
    errno.EACCES: SaveFailure.NOT_WRITABLE,
    errno.EPERM: SaveFailure.NOT_WRITABLE,
    errno.ENOENT: SaveFailure.ROOT_MISSING,
    errno.ENOTDIR: SaveFailure.ROOT_MISSING,
}


def classify(exc: BaseException) -> SaveFailure:
    """The cause of a save error (an `OSError`, or an error raised from one)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return _BY_ERRNO.get(seen.errno, SaveFailure.IO_ERROR)
        seen = seen.__cause__
    return SaveFailure.IO_ERROR


def note_save_failure(counters: Counters, exc: BaseException, what: str) -> SaveFailure:
    """Count a dropped save under its cause; log it if that cause is new here."""
    cause = classify(exc)
    counters.incr("saves_dropped")
    counters.incr(cause.counter)
    level = logging.WARNING if counters.first_time(cause.counter) else logging.DEBUG
    log.log(
        level,
        "%s dropped (%s): %s; later drops of this cause are only counted",
        what,
        cause.value,
        exc,
    )
    return cause
