"""What a caller can ask for: sampling parameters, request options, chat messages.

Every public call takes its options as named keywords (`CompletionOptions`),
which `parse_options` validates in one place before anything is queued: an
unknown option, a wrong type or an out-of-range value raises
`InvalidRequestError` naming the parameter. NumPy integers are accepted
wherever Python integers are.

::

    m.complete("Once upon a time", max_tokens=32, temperature=0.7, seed=42, stop=["\\n"])
    m.complete(prompt, sampling=SamplingParams(temperature=0.7, seed=42))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, NotRequired, Required, TypedDict

import numpy as np

from erllama_py.errors import InvalidRequestError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "JSON",
    "ModelOptions",
    "PENALTY_WINDOW",
    "ChatMessage",
    "Tool",
    "ToolFunction",
    "CompletionOptions",
    "FunctionCall",
    "RequestOptions",
    "SamplingParams",
    "ToolCall",
    "parse_key",
    "parse_options",
]

JSON = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
"""A JSON value (the only place where arbitrary data passes through the API)."""

DEFAULT_MAX_TOKENS = 128
PENALTY_WINDOW = 64
"""Tokens of context the repetition penalties look at (llama-cpp-python's default)."""
KEY_SIZE = 16
MAX_STOPS = 16


def _bad(param: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {msg}", param=param)


def _as_int(value: object) -> object:
    """A NumPy integer as a Python int; anything else as is."""
    return int(value) if isinstance(value, np.integer) else value


def _as_number(value: object) -> object:
    """A NumPy integer or float as a Python int or float; anything else as is."""
    return float(value) if isinstance(value, np.floating) else _as_int(value)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens; validated on construction.

    Chain order is fixed: grammar -> penalties -> top-k -> top-p -> min-p ->
    temperature -> pick. ``temperature <= 0`` picks greedily (and
    top-k/top-p/min-p, which never drop the most likely token, are skipped);
    otherwise the pick is a seeded draw keyed on ``(seed, position)``, so a
    resumed generation draws what one uninterrupted run would. The penalties
    (``repeat_penalty``, ``frequency_penalty``, ``presence_penalty``, as
    llama.cpp defines them) look at the last `PENALTY_WINDOW` tokens of the
    sequence. ``grammar`` is GBNF text whose start rule is ``root``;
    ``json_schema`` (JSON text) is compiled to such a grammar.

    Raises:
        InvalidRequestError: naming the bad field.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    grammar: str | None = None
    json_schema: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repeat_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise _bad(name, f"must be a finite number, got {v!r}")
        for name in ("top_k", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise _bad(name, f"must be an integer, got {v!r}")
        if self.temperature < 0:
            raise _bad("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise _bad("top_k", f"must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise _bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise _bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise _bad("repeat_penalty", f"must be > 0, got {self.repeat_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise _bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.seed < 2**64:
            raise _bad("seed", f"must be in [0, 2**64), got {self.seed}")
        if self.grammar is not None:
            if not isinstance(self.grammar, str) or not self.grammar.strip():
                raise _bad("grammar", "must be non-empty GBNF text")
            if "\x00" in self.grammar:
                raise _bad("grammar", "must not contain NUL")
        if self.json_schema is not None:
            if self.grammar is not None:
                raise _bad("json_schema", "give either grammar or json_schema, not both")
            if not isinstance(self.json_schema, str):
                raise _bad("json_schema", "must be JSON text (use from_dict for a mapping)")
            try:
                schema = json.loads(self.json_schema)
            except ValueError as e:
                raise _bad("json_schema", f"is not valid JSON: {e}") from e
            if not isinstance(schema, dict):
                kind = type(schema).__name__
                raise _bad("json_schema", f"must be a JSON object (a schema), got a {kind}")

    @property
    def greedy(self) -> bool:
        """True when the pick is the argmax (``temperature <= 0``)."""
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        """True when any repetition penalty is on."""
        return (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0 or self.presence_penalty != 0
        )

    @property
    def constrained(self) -> bool:
        """True when a grammar (or a JSON schema) restricts the tokens."""
        return self.grammar is not None or self.json_schema is not None

    def to_dict(self) -> dict[str, JSON]:
        """The fields as a plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SamplingParams:
        """Build from a mapping; unknown keys raise, a mapping ``json_schema`` is encoded."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise _bad(unknown[0], "unknown sampler option")
        kw: dict[str, object] = {k: _as_number(v) for k, v in d.items()}
        schema = kw.get("json_schema")
        if isinstance(schema, Mapping | list):
            kw["json_schema"] = json.dumps(schema)
        return cls(**kw)  # type: ignore[arg-type]  # every field is checked in __post_init__


class FunctionCall(TypedDict):
    """The function a tool call names, and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCall(TypedDict):
    """A tool call the assistant made (OpenAI's shape)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolFunction(TypedDict, total=False):
    """A function the model may call: its name, what it does, its arguments' JSON schema."""

    name: Required[str]
    description: NotRequired[str]
    parameters: NotRequired[dict[str, object]]


class Tool(TypedDict):
    """A tool offered to the model (OpenAI's shape), rendered by the chat template."""

    type: Literal["function"]
    function: ToolFunction


class ChatMessage(TypedDict, total=False):
    """One message of a conversation, as OpenAI's chat API writes it."""

    role: Required[str]
    content: Required[str | None]
    name: NotRequired[str]
    tool_call_id: NotRequired[str]
    tool_calls: NotRequired[list[ToolCall]]


class CompletionOptions(TypedDict, total=False):
    """The keyword options of every completion call (``complete``, ``chat``, ``stream``...).

    ``max_tokens`` (default 128; None = up to the context), ``stop`` (at most
    16 sequences; the text stops before them), ``stop_tokens`` (token ids that
    end generation once sampled; unlike a stop sequence the token is kept in
    ``tokens``, which is how a control token that renders as no text, such as a
    tool-call marker, is watched for), the sampling fields of
    `SamplingParams` (or a whole ``sampling`` object, which the individual
    fields then override), ``parent_key`` (the ``finish_key`` of the turn this
    prompt continues; a key of another model or context shape, or one that is
    not a prefix of the prompt, is treated as absent: the prompt goes through the
    normal lookup, and a foreign row is counted in ``foreign_refused``),
    ``timeout`` (seconds for the whole request; on expiry it ends with
    `RequestTimeoutError`, even when the worker stopped answering), ``logprobs``
    (report each generated token's log-probability and the ``logprobs`` most
    likely alternatives, 0 to 20; None: none) and ``require_room`` (raise `ContextOverflowError`
    unless the prompt plus ``max_tokens`` fit the context, as OpenAI's API
    does; by default generation stops where the context ends).
    """

    max_tokens: int | None
    stop: str | Sequence[str] | None
    stop_tokens: Sequence[int] | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int
    grammar: str | None
    json_schema: str | Mapping[str, JSON] | None
    sampling: SamplingParams
    parent_key: str | bytes | None
    timeout: float | None
    logprobs: int | None
    require_room: bool


class ModelOptions(TypedDict, total=False):
    """The keyword options of ``load_model`` (the keys of a ``models:`` entry of sys.yaml).

    ``model`` names a known model package (``"gemma-3-270m"``), or give
    ``model_path``; ``backend="stub"`` loads the deterministic test backend.
    ``n_ctx`` (tokens per sequence), ``n_batch`` (tokens per step),
    ``n_seq_max`` (concurrent sequences), ``n_threads``, ``tier`` (where its
    saves go), ``policy`` (save policy overrides), ``deterministic`` (hits
    always equal cold runs), ``restart`` (``intensity``, ``period_s`` of its
    worker), ``fingerprint`` (override the cache identity), ``stub`` (stub
    backend knobs).
    """

    model: str
    backend: Literal["llama", "stub"]
    n_ctx: int
    n_batch: int
    n_seq_max: int
    n_threads: int | None
    tier: str
    policy: Mapping[str, int | None]
    deterministic: bool
    restart: Mapping[str, float]
    fingerprint: str | bytes
    stub: Mapping[str, int | float]
    max_queue: int


@dataclass(frozen=True)
class RequestOptions:
    """Everything about a request but its prompt, validated."""

    max_tokens: int | None = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    stop_tokens: frozenset[int] = frozenset()
    parent_key: bytes | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    timeout_s: float | None = None
    logprobs: int | None = None
    require_room: bool = False


def _fail(message: str, param: str, model: str | None) -> InvalidRequestError:
    return InvalidRequestError(message, model, param=param)


def parse_key(value: object, param: str = "parent_key", model: str | None = None) -> bytes:
    """A cache key from bytes or its hex form.

    Raises:
        InvalidRequestError: not 16 bytes / 32 hex digits.
    """
    if isinstance(value, bytes | bytearray) and len(value) == KEY_SIZE:
        return bytes(value)
    if isinstance(value, str):
        try:
            key = bytes.fromhex(value)
        except ValueError:
            key = b""
        if len(key) == KEY_SIZE:
            return key
    raise _fail(f"{param} must be a cache key (32 hex digits), got {value!r}", param, model)


_SAMPLING_KEYS = frozenset(f.name for f in fields(SamplingParams))
_REQUEST_KEYS = frozenset(
    {
        "max_tokens",
        "stop",
        "stop_tokens",
        "parent_key",
        "sampling",
        "timeout",
        "logprobs",
        "require_room",
    }
)
MAX_LOGPROBS = 20
KNOWN_OPTIONS = _SAMPLING_KEYS | _REQUEST_KEYS


def parse_options(options: Mapping[str, object], model: str | None = None) -> RequestOptions:
    """Validate the keyword options of a completion call.

    Raises:
        InvalidRequestError: an unknown option or an invalid value (``param`` names it).
    """
    for name in options:
        if name not in KNOWN_OPTIONS:
            known = ", ".join(sorted(KNOWN_OPTIONS))
            raise _fail(f"unknown option {name!r} (known: {known})", name, model)
    get = options.get
    max_tokens = _as_int(get("max_tokens", DEFAULT_MAX_TOKENS))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise _fail(f"max_tokens must be an integer, got {max_tokens!r}", "max_tokens", model)
        if max_tokens < 0:
            raise _fail(f"max_tokens must be >= 0, got {max_tokens}", "max_tokens", model)
    stop_value = get("stop") or ()
    if isinstance(stop_value, str):
        stop_value = (stop_value,)
    if not isinstance(stop_value, list | tuple) or not all(isinstance(s, str) for s in stop_value):
        raise _fail(
            f"stop must be a string or a list of strings, got {stop_value!r}", "stop", model
        )
    if len(stop_value) > MAX_STOPS:
        raise _fail(f"at most {MAX_STOPS} stop sequences", "stop", model)
    stop_tokens = get("stop_tokens") or ()
    if not isinstance(stop_tokens, list | tuple | set | frozenset) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_tokens
    ):
        raise _fail(
            f"stop_tokens must be a list of token ids, got {stop_tokens!r}", "stop_tokens", model
        )
    parent = get("parent_key")
    timeout = _as_number(get("timeout"))
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise _fail(
            f"timeout must be a positive number of seconds, got {timeout!r}", "timeout", model
        )
    logprobs = _as_int(get("logprobs"))
    if logprobs is not None and (
        isinstance(logprobs, bool)
        or not isinstance(logprobs, int)
        or not 0 <= logprobs <= MAX_LOGPROBS
    ):
        raise _fail(
            f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}",
            "logprobs",
            model,
        )
    require_room = get("require_room", False)
    if not isinstance(require_room, bool):
        raise _fail(
            f"require_room must be true or false, got {require_room!r}", "require_room", model
        )
    base = get("sampling")
    if base is not None and not isinstance(base, SamplingParams):
        raise _fail(
            f"sampling must be a SamplingParams, got {type(base).__name__}", "sampling", model
        )
    overrides = {k: v for k, v in options.items() if k in _SAMPLING_KEYS and v is not None}
    try:
        merged: dict[str, object] = {**(base.to_dict() if base else {}), **overrides}
        sampling = SamplingParams.from_dict(merged) if merged else SamplingParams()
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), model, param=exc.param) from None
    return RequestOptions(
        max_tokens=max_tokens,
        stop=tuple(s for s in stop_value if s),
        stop_tokens=frozenset(stop_tokens),
        parent_key=None if parent is None else parse_key(parent, "parent_key", model),
        sampling=sampling,
        timeout_s=None if timeout is None else float(timeout),
        logprobs=logprobs,
        require_room=require_room,
    )
