"""What the public API returns: frozen, typed objects, each with ``to_dict()`` for JSON.

::

    result = m.complete(prompt, max_tokens=8)
    result.text, result.tokens, result.finish_reason   # "...", [412, 9, ...], "length"
    result.usage.cached_tokens, result.cache.kind           # 1984, HitKind.PREFIX
    result.timings.ttft_ms                                  # 3.2
    json.dumps(result.to_dict())

Streams yield `Delta` events, then one `Done` that carries the `Completion`.
Cache counters and rows are `erllama_py.cache.CounterSnapshot` and
`erllama_py.cache.RowInfo`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from erllama_py.config import SavePolicy
from erllama_py.kinds import FinishReason, HitKind, Phase
from erllama_py.params import JSON

__all__ = [
    "CacheHit",
    "Completion",
    "Delta",
    "Done",
    "ModelInfo",
    "ModelStatus",
    "StreamEvent",
    "Timings",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "WorkerStatus",
]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request; ``cached_tokens`` of the prompt came from the cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, JSON]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
        }


@dataclass(frozen=True, slots=True)
class CacheHit:
    """How the prompt was served: the hit's kind and how many prompt tokens it restored."""

    kind: HitKind
    prefix_len: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", HitKind(self.kind))  # a plain "exact" is accepted

    def to_dict(self) -> dict[str, JSON]:
        return {"kind": str(self.kind), "prefix_len": self.prefix_len}


@dataclass(frozen=True, slots=True)
class Timings:
    """Milliseconds: queued, restoring from the cache, prefilling (restore included),
    decoding, to the first token (None if none was sampled) and in all, from submission."""

    queue_ms: float
    restore_ms: float
    prefill_ms: float
    decode_ms: float
    ttft_ms: float | None
    total_ms: float

    def to_dict(self) -> dict[str, JSON]:
        return dict(asdict(self))


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the most likely tokens at a position: its id, bytes and log-probability."""

    token: int
    bytes: bytes
    logprob: float

    @property
    def text(self) -> str:
        return self.bytes.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, JSON]:
        return {"token": self.token, "text": self.text, "bytes": list(self.bytes),
                "logprob": self.logprob}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before any sampler), and the
    ``logprobs`` most likely tokens at its position, best first."""

    token: int
    bytes: bytes
    logprob: float
    top: list[TopLogprob]

    @property
    def text(self) -> str:
        return self.bytes.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, JSON]:
        return {
            "token": self.token,
            "text": self.text,
            "bytes": list(self.bytes),
            "logprob": self.logprob,
            "top": [t.to_dict() for t in self.top],
        }


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished request (frozen; ``tokens`` is a fresh list that belongs to the caller).

    ``tokens`` are the generated token ids (a stop sequence's tokens included,
    its text not). ``finish_key`` is the cache key of the state the request
    ended in (pass it as ``parent_key`` to continue the conversation), or None
    when that state was not saved. ``stop_sequence`` is the stop sequence that
    ended it, if one did.
    """

    id: str
    model: str
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    finish_key: str | None
    stop_sequence: str | None
    usage: Usage
    cache: CacheHit
    timings: Timings
    logprobs: list[TokenLogprob] | None = None
    """One entry per generated token when the request asked for ``logprobs``."""

    def to_dict(self) -> dict[str, JSON]:
        return {
            "id": self.id,
            "model": self.model,
            "text": self.text,
            "tokens": list(self.tokens),
            "finish_reason": str(self.finish_reason),
            "finish_key": self.finish_key,
            "stop_sequence": self.stop_sequence,
            "usage": self.usage.to_dict(),
            "cache": self.cache.to_dict(),
            "timings": self.timings.to_dict(),
            "logprobs": None if self.logprobs is None else [t.to_dict() for t in self.logprobs],
        }


@dataclass(frozen=True, slots=True)
class Delta:
    """Streamed text: whole UTF-8 characters, held back only where a stop sequence may start."""

    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None
    type: Literal["delta"] = field(default="delta", init=False)

    def to_dict(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {"type": "delta", "text": self.text, "tokens": list(self.tokens)}
        if self.logprobs is not None:
            out["logprobs"] = [t.to_dict() for t in self.logprobs]
        return out


@dataclass(frozen=True, slots=True)
class Done:
    """The last event of a stream."""

    completion: Completion
    type: Literal["done"] = field(default="done", init=False)

    def to_dict(self) -> dict[str, JSON]:
        return {"type": "done", "result": self.completion.to_dict()}


StreamEvent = Delta | Done


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A model's context worker process as its supervisor sees it."""

    pid: int | None
    state: str
    restarts: int

    def to_dict(self) -> dict[str, JSON]:
        return dict(asdict(self))


ModelStatus = Literal["loaded", "unloading", "failed"]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A loaded model: identity, settings, what it is doing, and its worker."""

    name: str
    status: ModelStatus
    phase: Phase
    pending_len: int
    active: int
    last_cache_hit: CacheHit | None
    requests_done: int
    tokens_generated: int
    backend: str
    path: str
    description: str
    architecture: str
    quant: str
    fingerprint: str
    n_vocab: int
    n_ctx: int
    n_ctx_train: int
    n_batch: int
    n_seq_max: int
    n_swa: int
    n_embd: int
    bos: int | None
    eos: int | None
    add_bos: bool
    chat_template: bool
    chat_template_fallback: str | None
    tier: str
    deterministic: bool
    max_queue: int
    policy: SavePolicy
    worker: WorkerStatus
    worker_starts: int
    loaded_at: float
    worker_hangs: int = 0  # workers killed for missing a call's deadline (phase ``hung``)
    seqs_moved: int = 0  # sequences moved to keep the ids in use consecutive (one pass)

    def to_dict(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("phase", "last_cache_hit", "policy", "worker")
        }
        out["phase"] = str(self.phase)
        out["last_cache_hit"] = (
            None if self.last_cache_hit is None else self.last_cache_hit.to_dict()
        )
        out["policy"] = dict(asdict(self.policy))
        out["worker"] = self.worker.to_dict()
        return out
