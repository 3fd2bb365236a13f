"""The writer pool: actors that run saves (`erllama_py.cache.publish.run_save`) off the
caller's thread, and the functions that queue jobs to them.

Writers are addressed by name (``cache_writer:<i>``) so a restart never
strands a caller. Each incarnation has its own writer id, recorded in the
reservations it holds: when it ends, the meta actor cleans them up by stage,
and every job still queued to it is failed rather than forgotten.
"""

from __future__ import annotations

import itertools
import logging
import queue
from typing import Any

import pykka

from erllama_py.cache.meta_client import meta_client
from erllama_py.cache.publish import SaveJob, SaveResult, prepare_file_save, run_save
from erllama_py.cache.state import WRITER_NAME, CacheState
from erllama_py.errors import (
    CacheError,
    PayloadTooLargeError,
    ReservationError,
    RuntimeStoppedError,
    TierFullError,
)
from supervisors import ActorKilledError, SupervisedActor

__all__ = ["WriterActor", "inbox_depth", "pick_writer", "submit_reserved", "submit_unreserved"]

log = logging.getLogger("erllama_py.cache")
_incarnations = itertools.count(1)


class WriterActor(SupervisedActor):
    """Runs save jobs one at a time; a job's failure fails the job, not the writer."""

    def __init__(self, shared: CacheState, index: int) -> None:
        super().__init__()
        self.shared = shared
        self.name = WRITER_NAME.format(index)
        self.writer_id = f"{self.name}#{next(_incarnations)}"

    def on_start(self) -> None:
        self.shared.writer_started(self.name, self.writer_id)

    def on_stop(self) -> None:
        self._ended()

    def on_failure(self, *_exc_info: object) -> None:
        self._ended()

    def _ended(self) -> None:
        self.shared.writer_ended(self.name, self.writer_id)
        # Jobs still queued here would otherwise never be answered.
        inbox: queue.Queue[Any] = self.actor_inbox  # type: ignore[assignment]
        while True:
            try:
                envelope = inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(envelope.message, SaveJob):
                _fail(envelope.message, CacheError("the writer stopped before this save ran"))
        meta_client(self.shared).tell.writer_down(self.writer_id)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, SaveJob):
            self._run(message)
            return None
        return super().on_receive(message)

    def _run(self, job: SaveJob) -> None:
        try:
            result = run_save(
                job,
                meta=meta_client(self.shared).ask,
                stores=self.shared.files,
                counters=self.shared.counters,
                writer=self.writer_id,
            )
        except ActorKilledError as exc:
            # A kill (a supervisor's brutal shutdown) ends the writer, not just this job:
            # on_failure then fails the jobs still queued and reports the writer down.
            _fail(job, exc)
            raise
        except Exception as exc:
            _fail(job, exc)
            return
        if not job.future.done():
            job.future.set_result(result)


def inbox_depth(ref: pykka.ActorRef[Any]) -> int:
    """Messages waiting in an actor's inbox (a `queue.Queue` for threading actors)."""
    inbox: queue.Queue[Any] = ref.actor_inbox  # type: ignore[assignment]
    return inbox.qsize()


def _fail(job: SaveJob, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)


def pick_writer(shared: CacheState, *, wait: bool = True) -> tuple[pykka.ActorRef[Any], str]:
    """The live writer with the fewest jobs in flight, and its id (waiting a little across a
    restart if `wait`).

    Raises:
        RuntimeStoppedError: no writer is running.
    """
    best: tuple[int, pykka.ActorRef[Any], str] | None = None
    for i in range(shared.settings.writers):
        ref = shared.registry.whereis(WRITER_NAME.format(i))
        if not isinstance(ref, pykka.ActorRef):
            continue
        writer_id = shared.writer_id_of(WRITER_NAME.format(i))
        if writer_id is None:
            continue
        depth = shared.jobs_in_flight(writer_id)  # the running job counts: not inbox_depth
        if best is None or depth < best[0]:
            best = (depth, ref, writer_id)
    if best is None:
        if not wait:
            raise RuntimeStoppedError("no cache writer is running")
        try:
            ref = shared.registry.wait_for(WRITER_NAME.format(0), 5.0)
        except Exception as exc:
            raise RuntimeStoppedError("no cache writer is running") from exc
        writer_id = shared.writer_id_of(WRITER_NAME.format(0))
        if not isinstance(ref, pykka.ActorRef) or writer_id is None:
            raise RuntimeStoppedError("no cache writer is running")
        return ref, writer_id
    return best[1], best[2]


def submit_reserved(shared: CacheState, job: SaveJob) -> bytes:
    """Frame and reserve in the calling thread, then queue the write; returns the key.

    After this returns, a request waiting for the key sees the save in flight.

    Raises:
        ReservationError (``already_present`` is not raised: the job's future
        resolves with an ``already_present`` result), PayloadTooLargeError,
        TierFullError, RuntimeStoppedError.
    """
    prefix, key, size = prepare_file_save(job)
    ref, writer_id = pick_writer(shared)
    try:
        token = _reserve_first_with_room(shared, job, key, size, writer_id)
    except ReservationError as exc:
        if exc.reason != "already_present":
            shared.counters.incr("saves_dropped")
            raise
        shared.counters.incr("duplicate_dropped")
        job.future.set_result(SaveResult(key, job.tier, size, "already_present"))
        return key
    except CacheError:
        shared.counters.incr("saves_dropped")
        raise
    job.prefix, job.key, job.token = prefix, key, token
    shared.job_queued(writer_id, job.future)
    try:
        ref.tell(job)
    except pykka.ActorDeadError:
        meta_client(shared).tell.cancel(key, job.tier, token)
        _fail(job, CacheError("the writer stopped before this save ran"))
    return key


def _reserve_first_with_room(
    shared: CacheState, job: SaveJob, key: bytes, size: int, writer_id: str
) -> int:
    """Reserve in `job.tier`, else in the first of its fallback tiers with room (then
    `job.tier` names it, counted in ``saves_redirected``); returns the token.

    Raises:
        the first tier's TierFullError / PayloadTooLargeError when none has room.
    """
    first_error: TierFullError | PayloadTooLargeError | None = None
    for tier in (job.tier, *job.fallback_tiers):
        if tier not in shared.files:  # a RAM tier never follows a file tier
            continue
        try:
            token = meta_client(shared).ask.reserve(job.reserve_request(key, tier, size, writer_id))
        except (TierFullError, PayloadTooLargeError) as exc:
            first_error = first_error or exc
            continue
        if tier != job.tier:
            shared.counters.incr("saves_redirected")
            job.tier = tier
        return int(token)
    assert first_error is not None
    raise first_error


def submit_unreserved(shared: CacheState, job: SaveJob) -> None:
    """Queue a job that reserves for itself (demotions: nobody waits for them).

    Safe to call from the meta actor's own thread: it sends no message to it.
    """
    try:
        ref, writer_id = pick_writer(shared, wait=False)
        shared.job_queued(writer_id, job.future)
        ref.tell(job)
    except (RuntimeStoppedError, pykka.ActorDeadError) as exc:
        log.info("demotion dropped: %s", exc)
        shared.counters.incr("saves_dropped")
        _fail(job, exc)
