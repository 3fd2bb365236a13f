"""The model actor: admission, queue, scheduling and cache decisions for one model.

It runs in the runtime process and drives the model's context worker (an OS
process) one tick at a time: each tick admits queued requests into free
sequences (resolving the cache for each), runs one worker step (every
decode-ready sequence's next token and the prefill slices that fit in
``n_batch``), applies the results (streaming text, saving at the policy's
points), and finishes what is done. Ticks are self-sent messages, so
submissions, cancellations and queries are served between them.

When the worker dies, every request in flight ends with `WorkerCrashedError`
at once (the channel closes under the blocked call); queued requests wait
for the supervisor to start a new worker and are then served.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import pykka

from erllama_py.cache.policy import should_continued_save, should_finish_save
from erllama_py.errors import (
    ContextOverflowError,
    ErllamaError,
    InvalidRequestError,
    ModelError,
    ModelFailedError,
    QueueFullError,
    RequestTimeoutError,
    RuntimeStoppedError,
    WorkerCrashedError,
)
from erllama_py.kinds import FinishReason, HitKind, Phase, SaveReason
from erllama_py.model.backend import validate_tokens
from erllama_py.model.client import WorkerClient
from erllama_py.model.planner import Planned, plan_tick
from erllama_py.model.preamble import PreambleCache
from erllama_py.model.prompt_cache import Deferred, PromptCache
from erllama_py.model.protocol import Prefill, SamplerSpec, TokenOut
from erllama_py.model.request import ChatPrompt, Request, RequestState, TextPrompt, TokenPrompt
from erllama_py.model.seqpool import SeqPool
from erllama_py.model.state import ModelState, worker_name
from erllama_py.params import PENALTY_WINDOW, ChatMessage, Tool
from erllama_py.results import CacheHit, Completion, Timings, TokenLogprob, TopLogprob, Usage
from erllama_py.timers import stop_timer
from supervisors import ProcessChild, SupervisedActor

__all__ = ["Call", "Cancel", "ModelActor", "Submit"]

log = logging.getLogger("erllama_py.model")
T = TypeVar("T")
RECONNECT_S = 0.02  # how often a model without a worker looks for the restarted one
WORKER_WAIT_S = 30.0  # how long a direct call (tokenize, embed...) waits for a restarting worker
DEFER_RETRY_S = 0.005  # how soon a request waiting for its parent's save is looked at again


@dataclass(frozen=True)
class Submit:
    """Queue a request (a text or chat prompt is tokenized by the worker on admission)."""

    request: Request


@dataclass(frozen=True)
class Cancel:
    """Stop a request between tokens (a queued one ends at once)."""

    request_id: str


@dataclass(frozen=True)
class Call(Generic[T]):
    """Run ``fn`` in the actor's thread and answer with its result: a typed ask
    (``ref.ask(Call(lambda actor: actor.tokenize(text)))``)."""

    fn: Callable[[ModelActor], T]


class _Tick:
    pass


class ModelActor(SupervisedActor):
    """See the module docstring. Address it by name: ``model:<name>/actor``."""

    def __init__(self, shared: ModelState) -> None:
        super().__init__()
        self.shared = shared
        self.name = shared.name
        self.client: WorkerClient | None = None
        self.cache: PromptCache | None = None
        self.pending: deque[RequestState] = deque()
        self.active: list[RequestState] = []
        self.free = SeqPool()
        self._tick_queued = False
        self._deferred = False
        self._timer: threading.Timer | None = None
        self._hung = False  # the last worker was killed for missing a deadline
        self.preambles = PreambleCache()
        self._compact = True  # close gaps in the seq ids in use (see _pack_seqs)

    # ------------------------------------------------------------------ lifecycle

    def on_start(self) -> None:
        self._connect()

    def on_stop(self) -> None:
        if self.shared.unloading:
            self._abandon(RuntimeStoppedError(f"model {self.name!r} was stopped"))
        else:  # stopped by its supervisor, which gave up: the worker kept crashing
            self._abandon(
                ModelFailedError(
                    f"model {self.name!r} failed (its worker kept crashing); unload and load it",
                    self.name,
                )
            )

    def on_failure(self, *_exc_info: object) -> None:
        self._abandon(ModelError(f"model {self.name!r} failed; its requests were lost", self.name))

    def _abandon(self, error: ErllamaError) -> None:
        stop_timer(self._timer)
        for r in self.active:
            r.sink.fail(error)
        for r in self.pending:
            r.sink.fail(error)
        self.active.clear()
        self.pending.clear()
        self._update_obs()

    def _connect(self) -> bool:
        """Attach to the current worker, if one is running."""
        if self.client is not None and self.client.process.alive:
            return True
        handle = self.shared.registry.whereis(worker_name(self.name))
        if not isinstance(handle, ProcessChild) or not handle.alive:
            return False
        client = WorkerClient(self.name, handle, self.shared.info, self.shared.deadline)
        try:
            client.reset()
        except WorkerCrashedError as exc:
            if exc.hung_s is not None:  # it never answered: killed, its successor comes next
                self._hung = True
                self.shared.obs.worker_hangs += 1
            return False  # it died before we could use it; its successor comes next
        self.client = client
        self._hung = False
        self.cache = PromptCache(self.shared, client)
        self.free = SeqPool(client.info.n_seq_max)
        return True

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: object) -> object:
        if isinstance(message, _Tick):
            self._tick_queued = False
            self._tick()
        elif isinstance(message, Submit):
            if len(self.pending) >= self.shared.max_queue:
                message.request.sink.fail(QueueFullError(self.name, self.shared.max_queue))
                return None
            self.pending.append(RequestState(message.request))
            self._update_obs()
            self._schedule()
        elif isinstance(message, Cancel):
            self._cancel(message.request_id)
        elif isinstance(message, Call):
            return message.fn(self)
        else:
            return super().on_receive(message)
        return None

    def _schedule(self, delay: float = 0.0) -> None:
        if self._tick_queued:
            return
        self._tick_queued = True
        if delay <= 0:
            self.actor_ref.tell(_Tick())
            return
        ref = self.actor_ref

        def later() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(_Tick())

        self._timer = threading.Timer(delay, later)
        self._timer.daemon = True
        self._timer.start()

    def _cancel(self, request_id: str) -> None:
        for r in self.active:
            if r.id == request_id:
                r.cancel_requested = True
                self._schedule()
                return
        for r in list(self.pending):
            if r.id == request_id:
                self.pending.remove(r)
                r.finish_reason = FinishReason.CANCELLED
                r.sink.finish(self._result(r))
                self._update_obs()
                return

    # ------------------------------------------------------------------ queries (asked)

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return self._direct(lambda w: w.tokenize(text, add_special, parse_special))

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self._direct(lambda w: w.detokenize(tokens))

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        template: str | None,
        tools: Sequence[Tool] | None = None,
    ) -> str:
        return self._direct(lambda w: w.chat_template(messages, template, tools))

    def embed(self, tokens: Sequence[int]) -> list[float]:
        return self._direct(lambda w: w.embed(tokens))

    def _direct(self, call: Callable[[WorkerClient], T]) -> T:
        """Run a stateless worker call, across one worker restart if it dies under it."""
        try:
            return call(self._worker())
        except WorkerCrashedError as exc:
            self._worker_lost(exc)
            return call(self._worker())

    def evict(self, reason: SaveReason = SaveReason.EVICT) -> int:
        """Save every request in flight (reason ``evict``); returns how many saves fired.

        With reason ``shutdown`` the key becomes the request's ``finish_key``,
        so its caller can resume it with ``parent_key``.
        """
        if self.client is None or self.cache is None:
            return 0
        fired = 0
        for r in self.active:
            if not (r.context and r.has_logits):
                continue
            key = self.cache.save(r, reason)
            if key is not None:
                fired += 1
                if reason is SaveReason.SHUTDOWN:
                    r.finish_key = key
        return fired

    def shutdown(self) -> int:
        """Unload: save what is in flight (reason ``shutdown``), end every request."""
        self.shared.unloading = True
        fired = 0
        with contextlib.suppress(WorkerCrashedError):
            fired = self.evict(SaveReason.SHUTDOWN)
        for r in list(self.active):
            r.finish_as(r.finish_reason or FinishReason.CANCELLED)
            self._finish(r, save=False)
        for r in self.pending:
            r.sink.fail(ModelError(f"model {self.name!r} was unloaded", self.name))
        self.pending.clear()
        self._update_obs()
        return fired

    def _worker(self) -> WorkerClient:
        """The worker, waiting (bounded) for a restarting one, as queued requests do."""
        deadline = time.monotonic() + WORKER_WAIT_S
        while not self._connect():
            if time.monotonic() >= deadline or self.shared.unloading:
                raise ModelError(f"model {self.name!r} has no running worker", self.name)
            with contextlib.suppress(Exception):
                self.shared.registry.wait_for(worker_name(self.name), RECONNECT_S * 10)
        assert self.client is not None
        return self.client

    # ------------------------------------------------------------------ the tick

    def _tick(self) -> None:
        self._expire()  # also while there is no worker: queued requests time out as usual
        if not self._connect():
            if self.pending or self.active or self._hung:
                self._schedule(RECONNECT_S)  # a hung phase ends when the new worker is up
            self._update_obs()
            return
        try:
            self._admit()
            for r in self.active:
                if r.cancel_requested and not r.finishing:
                    r.finish_as(FinishReason.CANCELLED)
            self._pack_seqs()
            assert self.client is not None
            info = self.client.info
            plan = plan_tick(
                self.active, info.n_batch, info.n_batch, deterministic=self.shared.deterministic
            )
            if plan:
                try:
                    results = self.client.step([p.op for p in plan])
                except WorkerCrashedError:
                    raise
                except ErllamaError as exc:
                    self._step_failed(plan, exc)
                else:
                    self._apply(plan, results)
            for r in list(self.active):
                if r.finishing:
                    self._finish(r)
        except WorkerCrashedError as exc:
            self._worker_lost(exc)
        self._update_obs()
        if self.active:
            self._schedule()
        elif self.pending:
            self._schedule(DEFER_RETRY_S if self._deferred else 0.0)
        elif self._hung:
            self._schedule(RECONNECT_S)

    def _expire(self) -> None:
        """End the requests whose ``timeout`` has passed: queued ones at once, running
        ones at the end of this tick (their state is saved as usual)."""
        now = time.perf_counter()
        for r in list(self.pending):
            deadline = r.request.deadline
            if deadline is not None and now >= deadline:
                self.pending.remove(r)
                r.sink.fail(self._timeout_error(r))
        for r in self.active:
            deadline = r.request.deadline
            if deadline is not None and now >= deadline and not r.finishing:
                r.timed_out = True
                r.finish_as(FinishReason.CANCELLED)

    def _timeout_error(self, r: RequestState) -> RequestTimeoutError:
        timeout = r.request.options.timeout_s or 0.0
        return RequestTimeoutError(
            f"request {r.id} did not finish within its timeout of {timeout:g} s",
            self.name,
            request_id=r.id,
        )

    def _admit(self) -> None:
        self._deferred = False
        while self.pending and self.free:
            r = self.pending.popleft()
            seq = self.free.take()
            r.seq = seq
            r.t_admit = time.perf_counter()
            try:
                self._start(r)
            except WorkerCrashedError:
                r.seq = r.sampler = r.first = None  # the dead worker's
                self.pending.appendleft(r)
                raise
            except Deferred:
                # Its parent's save is still being written: keep the FIFO order and
                # let the sequences already running go on meanwhile.
                self._release(r)
                self.pending.appendleft(r)
                self._deferred = True
                return
            except ErllamaError as exc:
                self._release(r)
                r.sink.fail(exc)
                continue
            self.active.append(r)
            if r.first is not None:
                op, out = r.first
                r.first = None
                self._apply([Planned(r, op, 1)], [out])

    def _pack_seqs(self) -> None:
        """Close the gaps in the seq ids in use: move the highest sequence into the
        lowest free id below it, until the ids in use are one run from 0.

        llama.cpp decodes one run of consecutive ids per pass over the weights
        (see seqpool.py): a gap left by a finished request would cost a whole pass
        on every step until the sequences above it finish. A move copies the
        sequence's KV cells in the worker (exact), once. It runs after admission,
        so a queued request takes a free id first.
        """
        client = self.client
        assert client is not None
        while self._compact:
            used = [r for r in self.active if r.seq is not None and not r.finishing]
            low = self.free.lowest()
            if not used or low is None:
                return
            top = max(used, key=lambda r: r.seq or 0)
            assert top.seq is not None
            if low > top.seq:
                return
            try:
                client.move_seq(top.seq, low)
            except WorkerCrashedError:
                raise
            except ErllamaError as exc:  # not expected; decoding goes on in more passes
                log.warning("model %s: cannot move sequences (%s); gaps stay", self.name, exc)
                self._compact = False
                return
            self.free.take()
            self.free.give(top.seq)
            top.seq = low
            self.shared.obs.seqs_moved += 1

    def _start(self, r: RequestState) -> None:
        client = self.client
        assert client is not None
        assert self.cache is not None
        info = client.info
        match r.request.prompt:
            case ChatPrompt(messages, template, tools):
                text = client.chat_template(messages, template, tools)
                r.prompt = client.tokenize(text, add_special=True, parse_special=True)
                r.preamble_at = self._preamble_at(client, r.request.prompt, r.prompt)
            case TextPrompt(text):
                r.prompt = client.tokenize(text)
            case TokenPrompt(tokens):
                r.prompt = list(tokens)
        if not r.prompt:
            raise InvalidRequestError("the prompt is empty", self.name, param="prompt")
        validate_tokens(r.prompt, info.n_vocab)
        if len(r.prompt) >= info.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(r.prompt)} tokens; the context holds {info.n_ctx} "
                "(including at least one generated token)",
                self.name,
                param="prompt",
            )
        wanted = r.max_tokens
        if r.request.options.require_room and wanted and len(r.prompt) + wanted > info.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(r.prompt)} tokens and max_tokens is {wanted}: "
                f"{len(r.prompt) + wanted} > {info.n_ctx}, the context's size",
                self.name,
                param="max_tokens",
            )
        if not r.prefill_only:
            # Only the penalty window primes a sampler: a long prompt is not shipped whole.
            spec = SamplerSpec(r.request.options.sampling, tuple(r.prompt[-PENALTY_WINDOW:]))
            if spec.params.constrained:
                r.sampler = client.new_sampler(spec)  # a bad grammar fails here, alone
            else:
                r.sampler_spec = spec  # cannot fail: validated on submission
        self.cache.resolve(r)  # an exact hit samples its first token with the restore
        if not r.cursor:  # an exact hit: nothing to prefill, decoding starts now
            r.t_prefill_done = time.perf_counter()
        if r.cursor == [] and (r.prefill_only or r.max_tokens == 0):
            r.finish_as(FinishReason.LENGTH)

    def _preamble_at(self, client: WorkerClient, chat: ChatPrompt, prompt: list[int]) -> int | None:
        """Where the chat's leading system messages end in its prompt (see preamble.py),
        when a save there could serve other conversations."""
        policy = self.shared.policy
        if self.shared.deterministic or not policy.saves_enabled:
            return None
        if len(prompt) < max(policy.cold_min_tokens, policy.min_tokens or 0):
            return None

        def render(leading: Sequence[ChatMessage]) -> list[int]:
            try:
                text = client.chat_template(leading, chat.template, chat.tools)
                return client.tokenize(text, add_special=True, parse_special=True)
            except WorkerCrashedError:
                raise
            except ModelError as exc:  # a template that wants more turns than a system prompt
                log.debug("model %s: no preamble save point: %s", self.name, exc)
                return []  # remembered: no save point for this preamble, no render again

        at = self.preambles.save_point(chat.messages, chat.template, chat.tools, prompt, render)
        return at if at is not None and at >= (policy.min_tokens or 0) else None

    def _apply(self, plan: Sequence[Planned], results: Sequence[TokenOut | None]) -> None:
        assert self.cache is not None
        assert self.client is not None
        n_ctx = self.client.info.n_ctx
        policy = self.shared.policy
        for p, result in zip(plan, results, strict=True):
            r = p.request
            if isinstance(p.op, Prefill):
                r.context.extend(r.cursor[: p.n])
                del r.cursor[: p.n]
                r.has_logits = True
                pos = len(r.context)
                boundary = self._canonical_boundary(pos)
                if r.cold_save_at == pos:
                    r.cold_save_at = None
                    self.cache.save(r, SaveReason.COLD, canonical=boundary)
                elif boundary:
                    self.cache.canonicalize(r)
                if r.end_save_at == pos:
                    r.end_save_at = None
                    if r.prefill_only or r.max_tokens == 0:
                        self.cache.save(r, self._end_reason(r))
                    else:
                        # Sampling the first token does not touch the KV cells: pack
                        # after it, so the save is not on the time to first token.
                        r.deferred_save = self._end_reason(r)
                if not r.cursor:
                    r.t_prefill_done = time.perf_counter()
                    if r.prefill_only or r.max_tokens == 0:
                        r.finish_as(FinishReason.LENGTH)
                    elif self.shared.deterministic and r.deferred_save is None:
                        r.deferred_canonicalize = True  # no save, but the state of one
                continue
            assert result is not None
            token, eog, piece = result.token, result.eog, result.piece
            if result.sampler is not None:
                r.sampler, r.sampler_spec = result.sampler, None
            if r.pending is not None:
                r.context.append(r.pending)  # decoded by this step
                r.pending = None
            if not r.t_first_token:
                r.t_first_token = time.perf_counter()
            if eog:
                r.finish_as(FinishReason.STOP)
                continue
            r.generated.append(token)
            r.pending = token
            self.shared.obs.tokens_generated += 1
            delta = r.text.feed(piece)
            if r.logprobs is None:
                r.sink.delta(delta, [token])
            else:
                entry = _token_logprob(result)
                r.logprobs.append(entry)
                r.sink.delta(delta, [token], [entry])
            self._run_deferred_save(r)
            if r.text.match is not None or token in r.request.options.stop_tokens:
                r.finish_as(FinishReason.STOP)
            elif (r.max_tokens is not None and len(r.generated) >= r.max_tokens) or len(
                r.context
            ) + 1 >= n_ctx:
                r.finish_as(FinishReason.LENGTH)
            elif should_continued_save(len(r.context), r.last_save_at, policy):
                self.cache.save(r, SaveReason.CONTINUED)

    def _run_deferred_save(self, r: RequestState) -> None:
        """The prompt-end save held back until the first token was sampled.

        In deterministic mode the state is canonicalized there whether a row is
        saved or not (``deferred_canonicalize``), so that outputs do not depend on
        the save policy or on which rows already exist.
        """
        assert self.cache is not None
        reason, r.deferred_save = r.deferred_save, None
        canonicalize, r.deferred_canonicalize = r.deferred_canonicalize, False
        if reason is not None:
            self.cache.save(r, reason, canonical=self.shared.deterministic)
        elif canonicalize:
            self.cache.canonicalize(r)

    def _canonical_boundary(self, pos: int) -> bool:
        """Whether deterministic mode canonicalizes a sequence at `pos` prompt tokens: at
        every ``n_batch`` boundary past a sliding window, in cold and warm runs alike,
        so that a row restored at a boundary holds the state a cold run has there."""
        info = self.shared.info
        return self.shared.deterministic and 0 < info.n_swa < pos and pos % info.n_batch == 0

    def _end_reason(self, r: RequestState) -> SaveReason:
        """Reason of the save at the end of a prompt: ``cold`` when its state is what a
        cold run computes (a cold path, or any path in deterministic mode)."""
        if r.hit is HitKind.COLD or self.shared.deterministic:
            return SaveReason.COLD
        return SaveReason.CONTINUED

    def _finish(self, r: RequestState, *, save: bool = True) -> None:
        assert self.cache is not None
        if save:
            self._run_deferred_save(r)
        tail = r.text.flush()
        if tail:
            r.sink.delta(tail, [])
        # A prefill exists to warm the cache: it saves whatever the policy's thresholds.
        policy = self.shared.policy
        wanted = r.prefill_only or should_finish_save(len(r.context), policy)
        if save and r.context and wanted:
            cold = r.prefill_only and r.hit is HitKind.COLD
            r.finish_key = self.cache.save(r, SaveReason.COLD if cold else SaveReason.FINISH)
        if r in self.active:
            self.active.remove(r)
        self.shared.obs.requests_done += 1
        self._update_obs()  # a caller reading model_info once it has its result sees this
        # The caller has its result before the worker frees the sampler and clears the
        # sequence (two round trips): nothing in the result depends on them, and the
        # sequence is free again before this tick admits anything.
        if r.timed_out:
            r.sink.fail(self._timeout_error(r))
        else:
            r.sink.finish(self._result(r))
        self._release(r)

    def _release(self, r: RequestState) -> None:
        """Free the request's sampler and sequence (the sequence is cleared)."""
        client = self.client
        if client is not None:
            try:
                if r.sampler is not None:
                    client.free_sampler(r.sampler)
                if r.seq is not None:
                    client.clear_seq(r.seq)
            except WorkerCrashedError:
                pass
        if r.seq is not None:
            self.free.give(r.seq)
        r.sampler = None
        r.seq = None

    def _step_failed(self, plan: Sequence[Planned], exc: ErllamaError) -> None:
        """A step failed without killing the worker: only the requests in it fail.

        Their sequences' state is unknown (llama.cpp may have decoded part of
        the batch), so they are cleared, never saved.
        """
        log.warning("model %s: a step failed (%s); %d request(s) failed", self.name, exc, len(plan))
        for p in plan:
            r = p.request
            if r in self.active:
                self.active.remove(r)
                self._release(r)
                r.sink.fail(exc)

    def _worker_lost(self, exc: WorkerCrashedError) -> None:
        log.warning("model %s: %s; %d request(s) failed", self.name, exc, len(self.active))
        for r in self.active:
            r.sink.fail(
                WorkerCrashedError(self.name, exc.exitcode, request_id=r.id, hung_s=exc.hung_s)
            )
        self.active.clear()
        self.client = None
        self.cache = None
        self.free = SeqPool()
        if exc.hung_s is not None:
            self._hung = True
            self.shared.obs.worker_hangs += 1
            self._update_obs()
            self._schedule(RECONNECT_S)

    # ------------------------------------------------------------------ results and obs

    def _result(self, r: RequestState) -> Completion:
        now = time.perf_counter()
        match = r.text.match
        submitted = r.request.submitted
        return Completion(
            id=r.id,
            model=self.name,
            text=r.text.text,
            tokens=list(r.generated),
            finish_reason=r.finish_reason or FinishReason.STOP,
            finish_key=r.finish_key.hex() if r.finish_key else None,
            stop_sequence=match.stop if match else None,
            usage=Usage(
                prompt_tokens=len(r.prompt),
                completion_tokens=len(r.generated),
                cached_tokens=r.hit_len,
            ),
            cache=CacheHit(r.hit, r.hit_len),
            logprobs=None if r.logprobs is None else list(r.logprobs),
            timings=Timings(
                queue_ms=r.elapsed_ms(submitted, r.t_admit or now),
                restore_ms=r.t_restore_ms,
                prefill_ms=r.elapsed_ms(r.t_admit, r.t_prefill_done or now) if r.t_admit else 0.0,
                decode_ms=r.elapsed_ms(r.t_prefill_done, now) if r.t_prefill_done else 0.0,
                ttft_ms=r.elapsed_ms(submitted, r.t_first_token) if r.t_first_token else None,
                total_ms=r.elapsed_ms(submitted, now),
            ),
        )

    def _update_obs(self) -> None:
        obs = self.shared.obs
        obs.pending_len = len(self.pending)
        obs.active = len(self.active)
        if self.client is None and self._hung:
            obs.phase = Phase.HUNG
        elif self.client is None and (self.pending or self.active):
            obs.phase = Phase.RESTARTING
        elif any(r.cursor for r in self.active):
            obs.phase = Phase.PREFILLING
        elif self.active:
            obs.phase = Phase.GENERATING
        else:
            obs.phase = Phase.IDLE


def _token_logprob(out: TokenOut) -> TokenLogprob:
    assert out.logprob is not None
    top = [TopLogprob(t, piece, lp) for t, lp, piece in out.top]
    return TokenLogprob(out.token, out.piece, out.logprob, top)
