"""Request options: defaults, validation, and the sampler configuration sent to a worker.

Every public call validates its options here before anything is queued: an
unknown option, a wrong type or an out-of-range value raises
`InvalidRequestError` naming the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from erllama_py.errors import InvalidRequestError
from erllama_py.model.backend import SamplerConfig

__all__ = ["DEFAULT_MAX_TOKENS", "KNOWN_OPTIONS", "RequestOptions", "parse_key", "parse_options"]

DEFAULT_MAX_TOKENS = 128
KEY_SIZE = 16
MAX_STOPS = 16


@dataclass(frozen=True)
class RequestOptions:
    """Everything about a request but its prompt."""

    max_tokens: int | None = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    parent_key: bytes | None = None
    sampling: SamplerConfig = field(default_factory=SamplerConfig)


def _fail(message: str, param: str, model: str | None) -> InvalidRequestError:
    return InvalidRequestError(message, model, param=param)


def _integer(value: object, param: str, model: str | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{param} must be an integer, got {value!r}", param, model)
    return value


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


_SAMPLING_KEYS = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "grammar", "json_schema"}
)
_REQUEST_KEYS = frozenset({"max_tokens", "stop", "parent_key"})
KNOWN_OPTIONS = _SAMPLING_KEYS | _REQUEST_KEYS


def parse_options(options: Mapping[str, Any], model: str | None = None) -> RequestOptions:
    """Validate keyword options of complete/stream/chat.

    Raises:
        InvalidRequestError: an unknown option or an invalid value (``param`` names it).
    """
    for name in options:
        if name not in KNOWN_OPTIONS:
            known = ", ".join(sorted(KNOWN_OPTIONS))
            raise _fail(f"unknown option {name!r} (known: {known})", name, model)
    get = options.get
    max_tokens = get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens is not None:
        max_tokens = _integer(max_tokens, "max_tokens", model)
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
    parent = get("parent_key")
    sampling_options = {k: v for k, v in options.items() if k in _SAMPLING_KEYS and v is not None}
    try:
        sampling = SamplerConfig.from_dict(sampling_options)
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), model, param=exc.param) from None
    return RequestOptions(
        max_tokens=max_tokens,
        stop=tuple(stop_value),
        parent_key=None if parent is None else parse_key(parent, "parent_key", model),
        sampling=sampling,
    )
