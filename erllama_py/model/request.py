"""One request's record inside a model actor, and the sink its caller reads from.

The record tracks exactly what the worker's sequence holds (`context`: the
tokens whose state is in its KV cells), what remains to prefill (`cursor`),
and what was generated, so that every save is keyed on the tokens its payload
really holds.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from erllama_py.model.textstream import TextStream
from erllama_py.params import RequestOptions

__all__ = ["CacheKind", "Event", "Request", "RequestSink"]

CacheKind = Literal["exact", "parent", "prefix", "cold"]
_ids = itertools.count(1)
log = logging.getLogger("erllama_py.model")


@dataclass(frozen=True)
class Event:
    """A stream event: ``delta`` (text, token ids), ``done`` (result) or ``error``."""

    type: Literal["delta", "done", "error"]
    text: str = ""
    tokens: tuple[int, ...] = ()
    result: dict[str, Any] | None = None
    error: BaseException | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (an error becomes its class and message)."""
        if self.type == "delta":
            return {"type": "delta", "text": self.text, "tokens": list(self.tokens)}
        if self.type == "done":
            return {"type": "done", "result": self.result}
        assert self.error is not None
        return {
            "type": "error",
            "error": {"type": type(self.error).__name__, "message": str(self.error)},
        }


class RequestSink:
    """Where a model actor delivers one request's events; read from any thread.

    Exactly one terminal event (``done`` or ``error``) is delivered; `future`
    resolves with the result or the error at the same moment.
    """

    def __init__(self, notify: Callable[[Event], None] | None = None) -> None:
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.future: Future[dict[str, Any]] = Future()
        self._notify = notify

    @property
    def done(self) -> bool:
        return self.future.done()

    def _put(self, event: Event) -> None:
        self.events.put(event)
        if self._notify is not None:
            try:
                self._notify(event)
            except Exception:  # the caller's problem (a closed event loop): never the model's
                log.debug("request event listener failed", exc_info=True)

    def delta(self, text: str, tokens: tuple[int, ...]) -> None:
        if not self.future.done():
            self._put(Event("delta", text=text, tokens=tokens))

    def finish(self, result: dict[str, Any]) -> None:
        if self.future.done():
            return
        self.future.set_result(result)
        self._put(Event("done", result=result))

    def fail(self, error: BaseException) -> None:
        if self.future.done():
            return
        self.future.set_exception(error)
        self._put(Event("error", error=error))


@dataclass
class Request:
    """A request admitted to (or queued by) a model actor."""

    prompt: list[int]
    options: RequestOptions
    sink: RequestSink
    prefill_only: bool = False
    stream: bool = False
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # Invariant: context == the tokens whose state the worker's sequence `seq` holds.
    seq: int | None = None
    sampler: int | None = None
    # A sampler the worker creates with the request's first token (no round trip of
    # its own): (config, history), until the worker answers with its id.
    sampler_spec: tuple[dict[str, Any], list[int]] | None = None
    context: list[int] = field(default_factory=list)
    cursor: list[int] = field(default_factory=list)
    cold_save_at: int | None = None
    end_save_at: int | None = None
    generated: list[int] = field(default_factory=list)
    # The last sampled token: generated, but in KV only once the next tick decodes it.
    pending: int | None = None
    text: TextStream = field(default_factory=TextStream)
    last_save_at: int = 0
    cache_kind: CacheKind = "cold"
    cache_prefix_len: int = 0
    cancel_requested: bool = False
    deferred_save: str | None = None  # a reason, or "" to canonicalize only (actor)
    parent_deadline: float = 0.0
    finishing: bool = False
    finish_reason: str | None = None
    finish_key: bytes | None = None
    error: BaseException | None = None
    has_logits: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    t_restore_ms: float = 0.0
    t_prefill_done: float = 0.0
    t_first_token: float = 0.0

    def __post_init__(self) -> None:
        self.text = TextStream(self.options.stop)

    @property
    def max_tokens(self) -> int | None:
        return 0 if self.prefill_only else self.options.max_tokens

    @property
    def decode_ready(self) -> bool:
        """Prefill done, logits present, still generating."""
        return not self.cursor and self.has_logits and not self.finishing

    def elapsed_ms(self, since: float, until: float | None = None) -> float:
        if not since:
            return 0.0
        return round(((until or time.perf_counter()) - since) * 1000.0, 3)
