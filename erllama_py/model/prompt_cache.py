"""How a model actor uses the cache: resolve a prompt on admission, restore, save.

On admission (spec 5.4, extended): the exact key of the prompt; then the
``parent_key`` (waiting a bounded time for its save to land); then the row
sharing the longest common prefix (the cache's token trie); then cold. A
restored row longer than the usable prefix is cut back to it (still
token-exact), when the model's KV layout allows it.

Payloads never pass through Python bytes: a RAM row is a slot of the runtime's
arena, which the worker reads from its own mapping; a file row is read
straight into a fresh arena slot, which is then promoted to RAM by reference
(or, without promotion, into a pooled shared buffer handed over by descriptor).

In deterministic mode only rows computed by prefill (reason ``cold``) are
restored, prefix hits are cut to a multiple of ``n_batch``, and the cold path
saves at the last ``n_batch`` boundary too, so that every hit continues
exactly as a cold run of the same prompt.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

from erllama_py.cache.key import encode_tokens
from erllama_py.cache.payload import has_checksum
from erllama_py.cache.policy import cold_save_split
from erllama_py.cache.publish import SaveResult
from erllama_py.cache.rows import Claim, RowInfo
from erllama_py.cache.save_failures import note_save_failure
from erllama_py.errors import (
    CHECKSUM_MISMATCH,
    CacheError,
    CacheFormatError,
    InvalidRequestError,
    ModelError,
    ReservationError,
    WorkerCrashedError,
)
from erllama_py.kinds import HitKind, SaveReason, TierKind
from erllama_py.model.arena import ArenaSlice
from erllama_py.model.client import WorkerClient
from erllama_py.model.protocol import GenerateOp, Unpacked
from erllama_py.model.request import RequestState
from erllama_py.model.state import ModelState
from erllama_py.model.statebuf import StateBuffer
from erllama_py.results import CacheHit

__all__ = ["PromptCache", "Deferred"]

log = logging.getLogger("erllama_py.model")
PREFIX_CANDIDATES = 16  # rows looked at for a prefix hit
PREFIX_ATTEMPTS = 3  # restores tried before going cold (a row may fail to load)


def _first_op(r: RequestState) -> GenerateOp | None:
    """The op that samples an exact hit's first token, when the request samples at all."""
    if r.prefill_only or r.max_tokens == 0 or r.seq is None:
        return None
    sampler = r.sampler if r.sampler is not None else r.sampler_spec
    if sampler is None:
        return None
    return GenerateOp(r.seq, sampler, None, r.request.options.logprobs)


class Deferred(Exception):
    """The request's parent save is still in flight: admit it again a little later."""


class PromptCache:
    """Cache operations of one model actor (runs in the actor's thread)."""

    def __init__(self, shared: ModelState, client: WorkerClient) -> None:
        self.shared = shared
        self.client = client
        self.cache = shared.cache
        self.namespace = shared.namespace()

    # ------------------------------------------------------------------ admission

    def resolve(self, r: RequestState) -> None:
        """Restore the best cached state for `r`'s prompt into its sequence, or go cold.

        Sets the request's context, cursor, logits flag, cache kind and prefix
        length, and its save points. Raises `WorkerCrashedError` if the
        worker dies meanwhile.
        """
        started = time.perf_counter()
        try:
            if self._exact(r) or self._parent(r) or self._prefix(r):
                return
            self._cold(r)
        finally:
            r.t_restore_ms = round((time.perf_counter() - started) * 1000.0, 3)
            self.shared.obs.last_cache_hit = CacheHit(r.hit, r.hit_len)

    def _allowed(self, info: RowInfo) -> bool:
        return not self.shared.deterministic or info.reason is SaveReason.COLD

    def _exact(self, r: RequestState) -> bool:
        key = self.cache.key(self.namespace, r.prompt)
        info = self.cache.lookup_key(key)
        if info is None or not self._allowed(info):
            return False
        then = _first_op(r)
        if not self._restore(r, key, len(r.prompt), then=then):
            return False
        self._warm(r, HitKind.EXACT, len(r.prompt))
        self.cache.count("hits_exact")
        return True

    def _parent(self, r: RequestState) -> bool:
        parent = r.request.options.parent_key
        if parent is None:
            return False
        info = self.cache.lookup_key(parent)
        if info is None and self.cache.pending(parent):
            if not r.parent_deadline:
                r.parent_deadline = r.t_admit + self.shared.policy.session_resume_wait_ms / 1000
            if time.perf_counter() < r.parent_deadline:
                raise Deferred
        if info is None or not 0 < info.n_tokens <= len(r.prompt) or not self._allowed(info):
            return False
        prefix = encode_tokens(r.prompt[: info.n_tokens])
        if not self._restore(r, parent, info.n_tokens, must_equal=prefix):
            return False
        self._warm(r, HitKind.PARENT, info.n_tokens)
        self.cache.count("hits_resume")
        return True

    def _prefix(self, r: RequestState) -> bool:
        """The row sharing the most tokens with the prompt that can be restored.

        Rows the mode may not use are passed over, and so are rows that would
        need a cut the KV layout cannot make: a sliding-window cache keeps only
        the last ``n_swa`` cells of a restored state, so a row longer than the
        window can only be restored whole.
        """
        n = len(r.prompt)
        policy = self.shared.policy
        info_model = self.shared.info
        floor = max(1, policy.min_tokens or 1)
        tried = 0
        for info, shared_len in self.cache.prefix_candidates(
            self.namespace, r.prompt, PREFIX_CANDIDATES, floor
        ):
            usable = min(shared_len, n - 1)
            if self.shared.deterministic:
                usable -= usable % info_model.n_batch
            if usable < floor or not self._allowed(info):
                continue
            cut = usable if usable < info.n_tokens else None
            if cut is not None and 0 < info_model.n_swa < info.n_tokens:
                continue
            tried += 1
            if self._restore(r, info.key, info.n_tokens, cut=cut):
                self._warm(r, HitKind.PREFIX, usable)
                self.cache.count("hits_prefix")
                return True
            if tried >= PREFIX_ATTEMPTS:
                break
        return False

    def _warm(self, r: RequestState, kind: HitKind, restored: int) -> None:
        r.hit = kind
        r.hit_len = restored
        r.context = list(r.prompt[:restored])
        r.cursor = list(r.prompt[restored:])
        # A whole-prompt restore carries its logits; a partial one gets them from the prefill.
        r.has_logits = True
        r.last_save_at = restored
        n = len(r.prompt)
        policy = self.shared.policy
        if r.cursor and policy.saves_enabled and n - restored >= (policy.min_tokens or 0):
            r.end_save_at = n
        if r.end_save_at is not None and r.preamble_at is not None and r.preamble_at > restored:
            r.cold_save_at = r.preamble_at  # a shorter row: another chat's preamble

    def _cold(self, r: RequestState) -> None:
        assert r.seq is not None
        self.client.clear_seq(r.seq)
        self.cache.count("misses")
        r.hit = HitKind.COLD
        r.hit_len = 0
        r.context = []
        r.cursor = list(r.prompt)
        r.has_logits = False
        n = len(r.prompt)
        policy = self.shared.policy
        if not policy.saves_enabled:
            return
        if self.shared.deterministic:
            n_batch = self.shared.info.n_batch
            aligned = n - n % n_batch
            if aligned >= max(1, policy.min_tokens or 0) and aligned < n:
                r.cold_save_at = aligned
        else:
            r.cold_save_at = cold_save_split(n, policy)
            if r.cold_save_at == n and r.preamble_at is not None:
                # Save where the chat's system preamble ends, for other chats that share
                # it, before the save at the prompt's end (for this chat's next turn).
                # A trimmed cold save (boundary_trim_tokens) keeps its place instead.
                r.cold_save_at = r.preamble_at
        if r.cold_save_at != n and n >= (policy.min_tokens or 0) and n >= policy.cold_min_tokens:
            r.end_save_at = n

    # ------------------------------------------------------------------ restore

    def _restore(
        self,
        r: RequestState,
        key: bytes,
        n_tokens: int,
        *,
        cut: int | None = None,
        must_equal: bytes | None = None,
        then: GenerateOp | None = None,
    ) -> bool:
        """Claim, load, unpack into `r`'s sequence, check in; cut back to `cut` tokens.

        With `then`, the worker samples the first token in the same call once the
        state is verified (it goes to ``r.first``)."""
        assert r.seq is not None
        claim = self.cache.claim(key)
        if claim is None:
            return False
        owned: StateBuffer | ArenaSlice | None = None
        try:
            if claim.namespace != self.namespace:
                # Another model's or context shape's state (a parent_key from elsewhere):
                # never restored, whatever its tokens; the request goes on as if it were absent.
                self.cache.count("foreign_refused")
                log.info("row %s belongs to another namespace; not restored", key.hex())
                return False
            if claim.n_tokens != n_tokens or (
                must_equal is not None and claim.tokens != must_equal
            ):
                return False
            buffer, owned, size, check = self._payload(claim)
            if buffer is None:
                return False
            try:
                # An unverified payload's checksum runs here while the worker restores;
                # the worker samples nothing before its verdict, and a mismatch clears it.
                unpacked = self.client.unpack(r.seq, buffer, size, check=check, then=then)
            except CacheFormatError as exc:
                if exc.reason == CHECKSUM_MISMATCH:
                    self.cache.reject(claim)
                else:
                    log.warning("row %s does not restore (%s); dropping it", key.hex(), exc.reason)
                    self.cache.drop(claim, exc.reason)
                return False
            except OSError as exc:  # the worker could not map it: the row is sound, go cold
                log.info("row %s not restored: %s", key.hex(), exc)
                self.client.clear_seq(r.seq)
                return False
            if not unpacked.verified:
                self.cache.reject(claim)
                return False
            restored = unpacked.n_tokens
            if restored != claim.n_tokens or (
                cut is not None and not self.client.truncate(r.seq, cut)
            ):
                self._forget_first(unpacked)
                self.client.clear_seq(r.seq)
                return False
            if then is not None and unpacked.first is not None:
                r.first = (then, unpacked.first)
            if owned is not None and claim.kind is not TierKind.RAM and self.cache.promotes_on_hit:
                self.cache.promote(claim, owned, owns_payload=True)
                owned = None
            return True
        finally:
            self.cache.checkin(claim)
            if owned is not None:
                self._give_back(owned)

    def _payload(
        self, claim: Claim
    ) -> tuple[
        StateBuffer | ArenaSlice | None,
        StateBuffer | ArenaSlice | None,
        int,
        Callable[[], bool] | None,
    ]:
        """The shared buffer to hand to the worker, the one we own (to give back, close
        or promote), the payload's size, and the check that must pass before anything
        is sampled from it (None: verified on loading already)."""
        if claim.kind is TierKind.RAM:
            stored = self.cache.ram_payload(claim)
            if isinstance(stored, ArenaSlice | StateBuffer) and not stored.closed:
                view = self.cache.load_ram_unverified(claim)  # no copy
                if view is None:
                    return None, None, 0, None
                check = None
                if claim.checksum is not None:
                    check = functools.partial(has_checksum, view, claim.checksum)
                return stored, None, view.nbytes, check
            view = self.cache.load(claim)  # verifies the checksum; no copy
            if view is None:
                return None, None, 0, None
            # A row saved through the cache API (bytes, not a shared buffer): one copy.
            try:
                copy = self.shared.arena.allocate(view.nbytes)
            except OSError as exc:  # no room to hand it over: serve this request cold
                log.info("row %s not restored: %s", claim.key.hex(), exc)
                return None, None, 0, None
            copy.view()[:] = view
            self.cache.count_load(0, copied=view.nbytes)
            return copy, copy, view.nbytes, None
        promote = self.cache.promotes_on_hit
        holder: list[StateBuffer | ArenaSlice] = []

        def allocate(size: int) -> memoryview:
            # A promoted buffer becomes the RAM row: it must be exactly the payload's size.
            buffer = (
                self.shared.arena.allocate(size) if promote else self.shared.buffers.acquire(size)
            )
            holder.append(buffer)
            return buffer.view()[:size]

        try:
            loaded = self.cache.load(claim, allocate, promote=False)
        except OSError:
            loaded = None
        if loaded is None:
            for buffer in holder:
                self._give_back(buffer)
            return None, None, 0, None
        size = loaded.nbytes
        del loaded
        return holder[0], holder[0], size, None

    def _forget_first(self, unpacked: Unpacked) -> None:
        """Free the sampler the worker created for a first token that is not used."""
        if unpacked.first is not None and unpacked.first.sampler is not None:
            self.client.free_sampler(unpacked.first.sampler)

    def _give_back(self, buffer: StateBuffer | ArenaSlice) -> None:
        if isinstance(buffer, ArenaSlice):
            buffer.close()
        else:
            self.shared.buffers.release(buffer)

    # ------------------------------------------------------------------ save

    def save(self, r: RequestState, reason: SaveReason, *, canonical: bool = False) -> bytes | None:
        """Pack `r`'s sequence and queue its save; returns the key, or None if refused.

        With `canonical` the sequence continues from its saved state even when
        the save itself is skipped (see `canonicalize`).
        """
        assert r.seq is not None
        if not r.context or not r.has_logits:
            return None
        key = self.cache.key(self.namespace, r.context)
        if self.cache.lookup_key(key) is not None or self.cache.pending(key):
            # Already saved or being saved (an exact hit that generated one token, a repeated
            # prompt, a finish save right after the cold save of the same tokens): packing
            # megabytes only to be told "already present" would stall the model.
            if canonical:
                self.canonicalize(r)
            return self._duplicate(r, key)
        started = time.perf_counter_ns()
        try:
            # Saves a later request may resume from mid-generation (cold, continued) make
            # the live run continue from the saved state, so that resumes are exact.
            canonical = canonical or reason in (SaveReason.COLD, SaveReason.CONTINUED)
            buffer = self.client.pack(r.seq, self.shared.arena, canonical=canonical)
        except InvalidRequestError as exc:  # no logits yet (a restore was just cut back)
            log.debug("%s save skipped: %s", reason, exc)
            return None
        except WorkerCrashedError:
            raise  # the worker is gone: the model's crash handling takes over
        except (OSError, ModelError) as exc:
            # No memory or descriptor for the state, here or in the worker: drop the save.
            self._save_failed(exc, reason)
            return None
        self.cache.count("pack_total_ns", time.perf_counter_ns() - started)
        try:
            ticket = self.cache.save_async(
                self.namespace,
                r.context,
                buffer,
                tier=self.shared.tier,
                reason=reason,
                owns_payload=True,
                extra={"model": self.shared.name},
            )
        except CacheError as exc:
            with contextlib.suppress(BufferError):
                buffer.close()
            if isinstance(exc, ReservationError) and exc.reason in ("already_present", "conflict"):
                return self._duplicate(r, key)  # another save of these tokens won the race
            if isinstance(exc.__cause__, OSError):
                return None  # counted and logged where it failed (publish.run_save)
            log.info("%s save of %s dropped: %s", reason, self.shared.name, exc)
            return None
        except OSError as exc:
            with contextlib.suppress(BufferError):
                buffer.close()
            self._save_failed(exc, reason)
            return None
        ticket.future.add_done_callback(_log_failure)
        r.last_save_at = len(r.context)
        return ticket.key

    def _save_failed(self, exc: BaseException, reason: SaveReason) -> None:
        note_save_failure(
            self.shared.cache.shared.counters, exc, f"a {reason} save of {self.shared.name}"
        )

    def canonicalize(self, r: RequestState) -> None:
        """Make `r`'s sequence continue from its own packed state, without saving it.

        On a sliding-window model past its window a restored state computes
        slightly differently from the live one (`Backend.pack`); deterministic
        mode does this at the same points in every run, whether or not a row
        is saved there, so that the state a hit restores is the one a cold run has.
        """
        assert r.seq is not None
        if r.has_logits and 0 < self.shared.info.n_swa < len(r.context):
            self.client.pack(r.seq, self.shared.arena, canonical=True).close()

    def _duplicate(self, r: RequestState, key: bytes) -> bytes:
        self.cache.count("duplicate_dropped")
        r.last_save_at = len(r.context)
        return key


def _log_failure(future: Future[SaveResult]) -> None:
    exc = future.exception()
    if exc is not None:  # counted (by cause) and logged once where it failed
        log.debug("cache save failed: %s", exc)
