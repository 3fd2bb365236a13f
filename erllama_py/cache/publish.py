"""The save pipeline run by the writer pool, and the publish protocol it follows.

A save reads no live model state: the payload was packed from a paused
context before the job was queued, so writers never hold up generation.

Publish protocol for a file tier (spec 4.12-4.14), one row per job; the
"if killed here" notes say what a crash of the writer (or of the whole
process) at that point leaves, and who cleans it up:

1. Frame the row: header, tokens and meta as one small *prefix*; the payload
   checksum is computed in place. A demotion's payload must still have the
   checksum its RAM row was published with, or it is dropped as corrupt.
   Nothing is written yet.
   *If killed here:* nothing on disk, nothing reserved.
2. Reserve (key, tier) and the row's bytes in the tier's quota with the meta
   actor; it evicts least recently used unpinned rows to make room, or
   refuses (``already_present`` counts as a duplicate, not an error).
   *If killed here:* a reservation without a file; its TTL or the writer's
   death notice removes it.
3. Create ``<key>.kvc.<pid>.<writer>.<token>.tmp`` with ``O_EXCL``, ``writev`` the
   prefix and the payload (never joined in memory), ``fdatasync``, close.
   *If killed here:* a temp file, never a published row. The reservation's
   cleanup removes it; the startup scan sweeps any that remain.
4. Check the reservation with the meta actor, just before linking: a writer
   whose reservation expired (it was too slow, or the meta restarted)
   abandons here and removes its temp file.
5. ``link(2)`` the temp file to ``<key>.kvc``, unlink the temp name, fsync the
   directory. EEXIST: the existing file is validated and adopted (first file
   wins), or replaced if invalid; never skipped.
   *If killed here:* a complete, data-synced file under its final name. The
   reservation's cleanup (TTL or death notice) finds it and adopts it after
   full validation; a restart's scan registers it.
6. Mark the reservation published, then announce the row: it becomes
   available, waiters are answered, the save counter is bumped. If the
   reservation expired meanwhile, the writer asks the meta actor to adopt the
   file instead.

For the RAM tier, steps 2-6 collapse into one meta message that installs the
payload by reference.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from erllama_py.cache import kvc
from erllama_py.cache.counters import Counters
from erllama_py.cache.filestore import FileStore
from erllama_py.cache.key import Namespace, make_key_encoded
from erllama_py.cache.payload import Payload, payload_checksum, payload_view, release_payload
from erllama_py.cache.ramstore import RamEntry
from erllama_py.cache.rows import Announcement, ReserveRequest
from erllama_py.cache.save_failures import note_save_failure
from erllama_py.errors import (
    CacheError,
    CacheFormatError,
    PayloadTooLargeError,
    ReservationError,
    TierFullError,
)
from erllama_py.kinds import SaveReason

if TYPE_CHECKING:
    from erllama_py.cache.meta import MetaActor

__all__ = ["SaveJob", "SaveResult", "prepare_file_save", "run_save"]

log = logging.getLogger("erllama_py.cache")

SAVE_COUNTERS: Mapping[SaveReason, str] = {
    SaveReason.COLD: "saves_cold",
    SaveReason.CONTINUED: "saves_continued",
    SaveReason.FINISH: "saves_finish",
    SaveReason.EVICT: "saves_evict",
    SaveReason.SHUTDOWN: "saves_shutdown",
}


@dataclass(frozen=True)
class SaveResult:
    """Outcome of a save: the key, where it lives, and whether this save wrote it."""

    key: bytes
    tier: str
    size: int
    status: Literal["saved", "already_present", "adopted"]
    # Payload bytes this save stored, and how many of them it copied to do so.
    payload_bytes: int = 0
    copied_bytes: int = 0


@dataclass
class SaveJob:
    """One save for the writer pool.

    ``tokens`` are u32 little-endian bytes. ``fallback_tiers`` are tried in
    order when ``tier`` has no room (a demotion, or a tier whose rows are all
    pinned). With ``owns_payload`` the writer releases the payload once it is
    written (or dropped), unless the RAM tier kept it. A job submitted by a
    model is *reserved* before it is queued (``prefix``, ``key``, ``token``
    set: steps 1-2 ran in the caller), so that a request waiting for that key
    knows a save is on its way.
    """

    namespace: Namespace
    tokens: bytes
    payload: Payload
    reason: SaveReason
    tier: str
    fallback_tiers: tuple[str, ...] = ()
    owns_payload: bool = False
    extra: Mapping[str, object] | None = None
    demotion: bool = False
    # The payload's checksum when it was published (a demotion's RAM row): a payload whose
    # bytes changed since is corrupt, and is never framed with a checksum of its own.
    checksum: int | None = None
    prefix: bytes | None = None
    key: bytes | None = None
    token: int | None = None
    future: Future[SaveResult] = field(default_factory=Future)

    def reserve_request(self, key: bytes, tier: str, size: int, writer: str) -> ReserveRequest:
        """What to reserve for this job's row of `size` bytes in `tier`."""
        return ReserveRequest(key, tier, self.namespace, self.tokens, size, self.reason, writer)


def run_save(
    job: SaveJob,
    *,
    meta: MetaActor,
    stores: Mapping[str, FileStore],
    counters: Counters,
    writer: str,
) -> SaveResult:
    """Run one save to completion (trying fallback tiers when a tier has no room for it).

    Raises:
        CacheError: the save was refused or failed (``saves_dropped`` counted).
    """
    keep_payload = False
    try:
        if job.token is not None:
            result = _save_file(job, job.tier, meta, stores[job.tier], writer)
            _count(result, job, counters)
            return result
        first_error: CacheError | None = None
        for tier in (job.tier, *job.fallback_tiers):
            try:
                if tier not in stores:  # the RAM tier has no file store
                    result = _save_ram(job, tier, meta)
                    keep_payload = result.status == "saved"
                else:
                    result = _save_file(job, tier, meta, stores[tier], writer)
            except (TierFullError, PayloadTooLargeError) as exc:
                # No room in this tier (or a row bigger than its whole quota): try the next.
                first_error = first_error or exc
                continue
            _count(result, job, counters)
            if job.demotion:
                if result.status != "already_present":
                    meta.count_demotion_in(result.tier)
            elif tier != job.tier:
                counters.incr("saves_redirected")
            return result
        assert first_error is not None
        raise first_error
    except CacheError as exc:
        counters.incr("saves_dropped")
        if isinstance(exc, CacheFormatError):
            counters.incr("corrupt_files")
            log.warning("cache: %s row not saved: %s", job.reason, exc)
        elif job.demotion:
            log.info("demotion of a %s row dropped: no tier had room", job.reason)
        raise
    except OSError as exc:
        note_save_failure(counters, exc, f"a {job.reason} save to {job.tier}")
        raise CacheError(f"save failed: {exc}") from exc
    finally:
        if job.owns_payload and not keep_payload:
            release_payload(job.payload)


def prepare_file_save(job: SaveJob) -> tuple[bytes, bytes, int]:
    """Step 1 for a file tier: frame the row. Returns (prefix, key, file size).

    Raises:
        CacheFormatError: ``checksum_mismatch``, the payload no longer has ``job.checksum``.
    """
    buffer = payload_view(job.payload)
    prefix, key = kvc.build_prefix_encoded(
        job.namespace, job.tokens, buffer, job.reason, extra=job.extra
    )
    if job.checksum is not None:
        framed = kvc.parse_prefix(prefix).payload_checksum
        if framed != job.checksum:
            detail = f"published as {job.checksum:016x}, now {framed:016x}"
            raise CacheFormatError("checksum_mismatch", f"row {key.hex()}: {detail}")
    return prefix, key, len(prefix) + memoryview(buffer).nbytes


def _count(result: SaveResult, job: SaveJob, counters: Counters) -> None:
    if result.status == "already_present":
        counters.incr("duplicate_dropped")
        return
    if job.demotion:
        counters.incr("demotions")
    else:
        counters.incr(SAVE_COUNTERS[job.reason])
    if result.status == "adopted":
        counters.incr("adoptions")
    counters.incr("saved_bytes", result.payload_bytes)
    counters.incr("save_bytes_copied", result.copied_bytes)


def _save_ram(job: SaveJob, tier: str, meta: MetaActor) -> SaveResult:
    key = make_key_encoded(job.namespace, job.tokens)
    payload = job.payload
    if not job.owns_payload and not isinstance(payload, bytes):
        # A caller's mutable buffer: the RAM tier must own an immutable copy.
        payload = bytes(payload_view(payload))
    size = payload_view(payload).nbytes
    copied = 0 if payload is job.payload else size
    entry = RamEntry(
        key=key,
        namespace=job.namespace,
        tokens=job.tokens,
        reason=job.reason,
        created_ns=time.time_ns(),
        checksum=payload_checksum(payload),
        size=size,
        payload=payload,
    )
    try:
        info = meta.store_ram(entry, tier)
    except ReservationError as exc:
        if exc.reason == "already_present":
            return SaveResult(key, tier, size, "already_present")
        raise
    if payload is not job.payload and job.owns_payload:
        release_payload(job.payload)
    return SaveResult(key, info.tier, info.size, "saved", size, copied)


def _save_file(
    job: SaveJob, tier: str, meta: MetaActor, store: FileStore, writer: str
) -> SaveResult:
    if job.token is not None:
        assert job.prefix is not None
        assert job.key is not None
        prefix, key, token = job.prefix, job.key, job.token
    else:
        prefix, key, size = prepare_file_save(job)
        try:
            token = meta.reserve(job.reserve_request(key, tier, size, writer))
        except ReservationError as exc:
            if exc.reason == "already_present":
                return SaveResult(key, tier, size, "already_present")
            raise
    temp = store.temp_path(key, writer, token)
    published = False
    try:
        # Inside the try: a payload that can no longer be read (a released shared buffer)
        # must cancel the reservation, not leave a "writing" row until its TTL.
        buffer = payload_view(job.payload)
        meta.set_temp_path(key, tier, token, temp)
        store.write_temp(temp, prefix, buffer)
        written = memoryview(buffer).nbytes  # one copy: from the buffer to the file
        meta.check_reservation(key, tier, token)
        final, final_size, adopted = store.link(temp, key)
        published = True
        header = kvc.parse_prefix(prefix)
        meta.mark_published(key, tier, token, final)
        meta.announce(
            Announcement(
                key,
                tier,
                token,
                final_size,
                final,
                checksum=None if adopted else header.payload_checksum,
                created_ns=None if adopted else header.created,
            )
        )
        status: Literal["saved", "adopted"] = "adopted" if adopted else "saved"
        return SaveResult(key, tier, final_size, status, written, written)
    except ReservationError:
        if not published:
            _remove(temp)
            raise
        # Our reservation was cleaned up after the link: the file is valid, adopt it.
        info = meta.adopt_file(tier, key, store.final_path(key))
        if info is None:
            raise
        return SaveResult(key, tier, info.size, "adopted", written, written)
    except BaseException:
        if not published:
            _remove(temp)
            meta.cancel(key, tier, token)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
