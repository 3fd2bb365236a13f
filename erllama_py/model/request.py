"""A request as its caller asked it (`Request`, immutable), the model actor's record of
its progress (`RequestState`, mutable), and the sink its caller reads from.

The state tracks exactly what the worker's sequence holds (`context`: the
tokens whose state is in its KV cells), what remains to prefill (`cursor`),
and what was generated, so that every save is keyed on the tokens its payload
really holds.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from erllama_py.errors import ErllamaError
from erllama_py.kinds import FinishReason, HitKind, SaveReason
from erllama_py.model.protocol import GenerateOp, SamplerSpec, TokenOut
from erllama_py.model.textstream import TextStream
from erllama_py.params import ChatMessage, RequestOptions, Tool
from erllama_py.results import Completion, Delta, Done, TokenLogprob

__all__ = [
    "ChatPrompt",
    "Failure",
    "PromptInput",
    "Request",
    "RequestSink",
    "RequestState",
    "SinkEvent",
    "TextPrompt",
    "TokenPrompt",
    "new_request_id",
]

_ids = itertools.count(1)
log = logging.getLogger("erllama_py.model")


def new_request_id() -> str:
    return f"req-{next(_ids)}"


@dataclass(frozen=True)
class TokenPrompt:
    """Token ids, used as given (no BOS added)."""

    tokens: tuple[int, ...]


@dataclass(frozen=True)
class TextPrompt:
    """Text, tokenized by the worker on admission (with BOS if the model wants one)."""

    text: str


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered with the model's chat template (or a named one)."""

    messages: tuple[ChatMessage, ...]
    template: str | None = None
    tools: tuple[Tool, ...] | None = None


PromptInput = TokenPrompt | TextPrompt | ChatPrompt


@dataclass(frozen=True)
class Failure:
    """The terminal event of a request that failed (the error is raised to its caller)."""

    error: ErllamaError


SinkEvent = Delta | Done | Failure


class RequestSink:
    """Where a model actor delivers one request's events; read from any thread.

    Exactly one terminal event (`Done` or `Failure`) is delivered; `future`
    resolves with the completion or the error at the same moment.
    """

    def __init__(self, notify: Callable[[SinkEvent], None] | None = None) -> None:
        self.events: queue.SimpleQueue[SinkEvent] = queue.SimpleQueue()
        self.future: Future[Completion] = Future()
        self._notify = notify
        # The actor and the timeout watchdog may both end a request: one terminal event.
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.future.done()

    def _put(self, event: SinkEvent) -> None:
        self.events.put(event)
        if self._notify is not None:
            try:
                self._notify(event)
            except Exception:  # the caller's problem (a closed event loop): never the model's
                log.debug("request event listener failed", exc_info=True)

    def delta(
        self, text: str, tokens: list[int], logprobs: list[TokenLogprob] | None = None
    ) -> None:
        if not self.future.done():
            self._put(Delta(text, tokens, logprobs))

    def finish(self, completion: Completion) -> None:
        with self._lock:
            if self.future.done():
                return
            self.future.set_result(completion)
        self._put(Done(completion))

    def fail(self, error: ErllamaError) -> None:
        with self._lock:
            if self.future.done():
                return
            self.future.set_exception(error)
        self._put(Failure(error))


@dataclass(frozen=True)
class Request:
    """What the caller asked; never changed once submitted."""

    prompt: PromptInput
    options: RequestOptions
    sink: RequestSink = field(default_factory=RequestSink)
    prefill_only: bool = False
    id: str = field(default_factory=new_request_id)
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def max_tokens(self) -> int | None:
        return 0 if self.prefill_only else self.options.max_tokens

    @property
    def deadline(self) -> float | None:
        """When the request's ``timeout`` expires (`time.perf_counter` seconds), if it has one."""
        timeout = self.options.timeout_s
        return None if timeout is None else self.submitted + timeout


@dataclass
class RequestState:
    """A model actor's record of one request, from queueing to its end."""

    request: Request
    prompt: list[int] = field(default_factory=list)  # resolved on admission
    # Invariant: context == the tokens whose state the worker's sequence `seq` holds.
    seq: int | None = None
    sampler: int | None = None
    # A sampler the worker creates with the request's first token (no round trip of its
    # own), until the worker answers with its id.
    sampler_spec: SamplerSpec | None = None
    context: list[int] = field(default_factory=list)
    cursor: list[int] = field(default_factory=list)
    cold_save_at: int | None = None
    end_save_at: int | None = None
    # Where a chat's leading system messages end (a state other chats can continue from).
    preamble_at: int | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    # The last sampled token: generated, but in KV only once the next tick decodes it.
    pending: int | None = None
    # The first token of an exact hit, sampled by the worker with the restore (see
    # protocol.Unpack) and applied on admission as a step's result would be.
    first: tuple[GenerateOp, TokenOut] | None = None
    text: TextStream = field(init=False)
    last_save_at: int = 0
    hit: HitKind = HitKind.COLD
    hit_len: int = 0
    cancel_requested: bool = False
    timed_out: bool = False
    # The prompt-end save held back until the first token is sampled (its reason), and
    # whether deterministic mode canonicalizes there even without a save.
    deferred_save: SaveReason | None = None
    deferred_canonicalize: bool = False
    parent_deadline: float = 0.0
    finishing: bool = False
    finish_reason: FinishReason | None = None
    finish_key: bytes | None = None
    has_logits: bool = False
    t_admit: float = 0.0
    t_restore_ms: float = 0.0
    t_prefill_done: float = 0.0
    t_first_token: float = 0.0

    def __post_init__(self) -> None:
        self.text = TextStream(self.request.options.stop)
        if self.request.options.logprobs is not None:
            self.logprobs = []

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def sink(self) -> RequestSink:
        return self.request.sink

    @property
    def prefill_only(self) -> bool:
        return self.request.prefill_only

    @property
    def max_tokens(self) -> int | None:
        return self.request.max_tokens

    @property
    def decode_ready(self) -> bool:
        """Prefill done, logits present, still generating."""
        return not self.cursor and self.has_logits and not self.finishing

    def finish_as(self, reason: FinishReason) -> None:
        """Mark the request as ending (it ends at the end of this tick)."""
        self.finishing = True
        self.finish_reason = reason

    def elapsed_ms(self, since: float, until: float | None = None) -> float:
        if not since:
            return 0.0
        return round(((until or time.perf_counter()) - since) * 1000.0, 3)
