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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pykka

from erllama_py.cache.policy import should_continued_save, should_finish_save
from erllama_py.errors import (
    ContextOverflowError,
    ErllamaError,
    InvalidRequestError,
    ModelError,
    ModelFailedError,
    RuntimeStoppedError,
    WorkerCrashedError,
)
from erllama_py.model.backend import validate_tokens
from erllama_py.model.cachepath import CachePath, Deferred
from erllama_py.model.client import WorkerClient
from erllama_py.model.planner import Planned, plan_tick
from erllama_py.model.request import Request
from erllama_py.model.shared import ModelShared, worker_name
from supervisors import ProcessChild, SupervisedActor

__all__ = ["Cancel", "ModelActor", "Submit"]

log = logging.getLogger("erllama_py.model")
T = TypeVar("T")
RECONNECT_S = 0.02  # how often a model without a worker looks for the restarted one
WORKER_WAIT_S = 30.0  # how long a direct call (tokenize, embed...) waits for a restarting worker
DEFER_RETRY_S = 0.005  # how soon a request waiting for its parent's save is looked at again


@dataclass(frozen=True)
class Submit:
    """Queue a request. ``text`` is tokenized by the worker on admission when given."""

    request: Request
    text: str | None = None
    chat: Sequence[Mapping[str, Any]] | None = None
    template: str | None = None


@dataclass(frozen=True)
class Cancel:
    """Stop a request between tokens (a queued one ends at once)."""

    request_id: str


class _Tick:
    pass


class ModelActor(SupervisedActor):
    """See the module docstring. Address it by name: ``model:<name>/actor``."""

    def __init__(self, shared: ModelShared) -> None:
        super().__init__()
        self.shared = shared
        self.name = shared.name
        self.client: WorkerClient | None = None
        self.cachepath: CachePath | None = None
        self.pending: deque[tuple[Request, Submit]] = deque()
        self.active: list[Request] = []
        self.free: list[int] = []
        self._tick_queued = False
        self._deferred = False
        self._timer: threading.Timer | None = None

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

    def on_failure(self, *_exc_info: Any) -> None:
        self._abandon(ModelError(f"model {self.name!r} failed; its requests were lost", self.name))

    def _abandon(self, error: ErllamaError) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for r in self.active:
            r.sink.fail(error)
        for r, _ in self.pending:
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
        client = WorkerClient(self.name, handle, self.shared.info)
        try:
            client.reset()
        except WorkerCrashedError:
            return False  # it died before we could use it; its successor comes next
        self.client = client
        self.cachepath = CachePath(self.shared, client)
        self.free = list(range(client.info.n_seq_max))
        return True

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Tick):
            self._tick_queued = False
            self._tick()
        elif isinstance(message, Submit):
            self.pending.append((message.request, message))
            self._update_obs()
            self._schedule()
        elif isinstance(message, Cancel):
            self._cancel(message.request_id)
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
        for item in list(self.pending):
            if item[0].id == request_id:
                self.pending.remove(item)
                item[0].finish_reason = "cancelled"
                item[0].sink.finish(self._result(item[0]))
                self._update_obs()
                return

    # ------------------------------------------------------------------ queries (asked)

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return self._direct(lambda w: w.tokenize(text, add_special, parse_special))

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self._direct(lambda w: w.detokenize(tokens))

    def render_chat(self, messages: Sequence[Mapping[str, Any]], template: str | None) -> str:
        return self._direct(lambda w: w.chat_template(messages, template))

    def embed(self, tokens: Sequence[int]) -> list[float]:
        return self._direct(lambda w: w.embed(tokens))

    def _direct(self, call: Callable[[WorkerClient], T]) -> T:
        """Run a stateless worker call, across one worker restart if it dies under it."""
        try:
            return call(self._worker())
        except WorkerCrashedError as exc:
            self._worker_lost(exc)
            return call(self._worker())

    def evict(self, reason: str = "evict") -> int:
        """Save every request in flight (reason ``evict``); returns how many saves fired.

        With reason ``shutdown`` the key becomes the request's ``finish_key``,
        so its caller can resume it with ``parent_key``.
        """
        if self.client is None or self.cachepath is None:
            return 0
        fired = 0
        for r in self.active:
            if not (r.context and r.has_logits):
                continue
            key = self.cachepath.save(r, reason)
            if key is not None:
                fired += 1
                if reason == "shutdown":
                    r.finish_key = key
        return fired

    def shutdown(self) -> int:
        """Unload: save what is in flight (reason ``shutdown``), end every request."""
        self.shared.unloading = True
        fired = 0
        with contextlib.suppress(WorkerCrashedError):
            fired = self.evict("shutdown")
        for r in list(self.active):
            r.finishing = True
            r.finish_reason = r.finish_reason or "cancelled"
            self._finish(r, save=False)
        for r, _ in self.pending:
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
        if not self._connect():
            if self.pending or self.active:
                self._schedule(RECONNECT_S)
            self._update_obs()
            return
        try:
            self._admit()
            for r in self.active:
                if r.cancel_requested and not r.finishing:
                    r.finishing = True
                    r.finish_reason = "cancelled"
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

    def _admit(self) -> None:
        self._deferred = False
        while self.pending and self.free:
            r, submit = self.pending.popleft()
            seq = self.free.pop(0)
            r.seq = seq
            r.t_admit = time.perf_counter()
            try:
                self._start(r, submit)
            except WorkerCrashedError:
                r.seq = None
                self.pending.appendleft((r, submit))
                raise
            except Deferred:
                # Its parent's save is still being written: keep the FIFO order and
                # let the sequences already running go on meanwhile.
                self._release(r)
                self.pending.appendleft((r, submit))
                self._deferred = True
                return
            except ErllamaError as exc:
                self._release(r)
                r.sink.fail(exc)
                continue
            self.active.append(r)

    def _start(self, r: Request, submit: Submit) -> None:
        client = self.client
        assert client is not None
        assert self.cachepath is not None
        info = client.info
        if submit.chat is not None:
            text = client.chat_template(submit.chat, submit.template)
            r.prompt = client.tokenize(text, add_special=True, parse_special=True)
        elif submit.text is not None:
            r.prompt = client.tokenize(submit.text)
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
        self.cachepath.resolve(r)
        if not r.cursor:  # an exact hit: nothing to prefill, decoding starts now
            r.t_prefill_done = time.perf_counter()
        if not r.prefill_only:
            config = r.options.sampling.to_dict()
            if config.get("grammar") is None and config.get("json_schema") is None:
                r.sampler_spec = (config, list(r.prompt))  # cannot fail: validated here
            else:
                r.sampler = client.new_sampler(config, r.prompt)
        if r.cursor == [] and (r.prefill_only or r.max_tokens == 0):
            r.finishing = True
            r.finish_reason = "length"

    def _apply(self, plan: Sequence[Planned], results: Sequence[Any]) -> None:
        assert self.cachepath is not None
        assert self.client is not None
        n_ctx = self.client.info.n_ctx
        policy = self.shared.policy
        for p, result in zip(plan, results, strict=True):
            r = p.request
            if p.op[0] == "prefill":
                r.context.extend(r.cursor[: p.n])
                del r.cursor[: p.n]
                r.has_logits = True
                pos = len(r.context)
                boundary = self._canonical_boundary(pos)
                if r.cold_save_at == pos:
                    r.cold_save_at = None
                    self.cachepath.save(r, "cold", canonical=boundary)
                elif boundary:
                    self.cachepath.canonicalize(r)
                if r.end_save_at == pos:
                    r.end_save_at = None
                    if r.prefill_only or r.max_tokens == 0:
                        self.cachepath.save(r, self._end_reason(r))
                    else:
                        # Sampling the first token does not touch the KV cells: pack
                        # after it, so the save is not on the time to first token.
                        r.deferred_save = self._end_reason(r)
                if not r.cursor:
                    r.t_prefill_done = time.perf_counter()
                    if r.prefill_only or r.max_tokens == 0:
                        r.finishing = True
                        r.finish_reason = "length"
                    elif self.shared.deterministic and r.deferred_save is None:
                        r.deferred_save = ""  # no save here, but the same state as with one
                continue
            token, eog, piece = result[:3]
            if len(result) > 3:
                r.sampler, r.sampler_spec = result[3], None
            if r.pending is not None:
                r.context.append(r.pending)  # decoded by this step
                r.pending = None
            if not r.t_first_token:
                r.t_first_token = time.perf_counter()
            if eog:
                r.finishing = True
                r.finish_reason = "stop"
                continue
            r.generated.append(token)
            r.pending = token
            self.shared.obs.tokens_generated += 1
            delta = r.text.feed(piece)
            r.sink.delta(delta, (token,))
            self._run_deferred_save(r)
            if r.text.match is not None:
                r.finishing = True
                r.finish_reason = "stop"
            elif (r.max_tokens is not None and len(r.generated) >= r.max_tokens) or len(
                r.context
            ) + 1 >= n_ctx:
                r.finishing = True
                r.finish_reason = "length"
            elif should_continued_save(len(r.context), r.last_save_at, policy):
                self.cachepath.save(r, "continued")

    def _run_deferred_save(self, r: Request) -> None:
        """The prompt-end save held back until the first token was sampled.

        In deterministic mode the state is canonicalized there whether a row is
        saved or not (``deferred_save == ""``), so that outputs do not depend on
        the save policy or on which rows already exist.
        """
        if r.deferred_save is None:
            return
        assert self.cachepath is not None
        reason, r.deferred_save = r.deferred_save, None
        if reason:
            self.cachepath.save(r, reason, canonical=self.shared.deterministic)
        else:
            self.cachepath.canonicalize(r)

    def _canonical_boundary(self, pos: int) -> bool:
        """Whether deterministic mode canonicalizes a sequence at `pos` prompt tokens: at
        every ``n_batch`` boundary past a sliding window, in cold and warm runs alike,
        so that a row restored at a boundary holds the state a cold run has there."""
        info = self.shared.info
        return self.shared.deterministic and 0 < info.n_swa < pos and pos % info.n_batch == 0

    def _end_reason(self, r: Request) -> str:
        """Reason of the save at the end of a prompt: ``cold`` when its state is what a
        cold run computes (a cold path, or any path in deterministic mode)."""
        return "cold" if r.cache_kind == "cold" or self.shared.deterministic else "continued"

    def _finish(self, r: Request, *, save: bool = True) -> None:
        assert self.cachepath is not None
        if save:
            self._run_deferred_save(r)
        tail = r.text.flush()
        if tail:
            r.sink.delta(tail, ())
        if save and r.context and should_finish_save(len(r.context), self.shared.policy):
            reason = "cold" if r.prefill_only and r.cache_kind == "cold" else "finish"
            r.finish_key = self.cachepath.save(r, reason)
        self._release(r)
        if r in self.active:
            self.active.remove(r)
        self.shared.obs.requests_done += 1
        r.sink.finish(self._result(r))

    def _release(self, r: Request) -> None:
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
        if r.seq is not None and r.seq not in self.free:
            self.free.insert(0, r.seq)
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
            r.sink.fail(WorkerCrashedError(self.name, exc.exitcode, request_id=r.id))
        self.active.clear()
        self.client = None
        self.cachepath = None
        self.free = []

    # ------------------------------------------------------------------ results and obs

    def _result(self, r: Request) -> dict[str, Any]:
        now = time.perf_counter()
        match = r.text.match
        return {
            "id": r.id,
            "model": self.name,
            "text": r.text.text,
            "tokens": list(r.generated),
            "finish_reason": r.finish_reason or "stop",
            "finish_key": r.finish_key.hex() if r.finish_key else None,
            "stop_sequence": match.stop if match else None,
            "usage": {
                "prompt_tokens": len(r.prompt),
                "completion_tokens": len(r.generated),
                "total_tokens": len(r.prompt) + len(r.generated),
                "cached_tokens": r.cache_prefix_len,
            },
            "cache": {"kind": r.cache_kind, "prefix_len": r.cache_prefix_len},
            "timings": {
                "queue_ms": r.elapsed_ms(r.t_submit, r.t_admit or now),
                "restore_ms": r.t_restore_ms,
                "prefill_ms": r.elapsed_ms(r.t_admit, r.t_prefill_done or now)
                if r.t_admit
                else 0.0,
                "decode_ms": r.elapsed_ms(r.t_prefill_done, now) if r.t_prefill_done else 0.0,
                "ttft_ms": r.elapsed_ms(r.t_submit, r.t_first_token) if r.t_first_token else None,
                "total_ms": r.elapsed_ms(r.t_submit, now),
            },
        }

    def _update_obs(self) -> None:
        obs = self.shared.obs
        obs.pending_len = len(self.pending)
        obs.active = len(self.active)
        if self.client is None and (self.pending or self.active):
            obs.phase = "restarting"
        elif any(r.cursor for r in self.active):
            obs.phase = "prefilling"
        elif self.active:
            obs.phase = "generating"
        else:
            obs.phase = "idle"
