"""Errors raised by erllama-py.

Catch the family you can act on; every class carries what the caller needs::

    ErllamaError
    ├── ConfigError                 sys.yaml or a per-model option is invalid (key path + reason)
    ├── CacheError                  the KV cache refused or failed an operation
    │   ├── InvalidTokensError      a token id outside [0, 2**32) or a malformed token list
    │   ├── CacheFormatError        a cache file failed strict parsing (magic, version, size,
    │   │                           checksum, key)
    │   ├── PayloadTooLargeError    a row is larger than its tier's whole quota
    │   ├── TierFullError           no room can be made: the tier's bytes are pinned or in flight
    │   ├── UnknownTierError        a save or load named a tier the cache does not have
    │   └── ReservationError        the publish protocol lost its reservation
    │       (reason: already_present | conflict | expired)
    ├── ModelError                  something about a model or a request to it
    │   ├── ModelNotFoundError      no model is loaded under that name
    │   ├── ModelAlreadyLoadedError load_model with a name in use
    │   ├── ModelLoadError          the GGUF could not be loaded (bad path, corrupt, unsupported)
    │   ├── ModelFailedError        the model's restart intensity is exhausted; reload it
    │   ├── WorkerCrashedError      the context worker process died under a request
    │   │                           (exit code or signal), or hung and was killed
    │   ├── RequestTimeoutError     the request's own timeout expired
    │   ├── QueueFullError          the model's queue of waiting requests is full: retry later
    │   └── InvalidRequestError     bad arguments: empty prompt, unknown option, token id
    │       │                       outside the vocabulary, negative max_tokens, ...
    │       └── ContextOverflowError  the prompt (plus max_tokens) does not fit n_ctx
    └── RuntimeStoppedError         the runtime was stopped; start a new one
"""

from __future__ import annotations

import signal

__all__ = [
    "CacheError",
    "CacheFormatError",
    "ConfigError",
    "ContextOverflowError",
    "ErllamaError",
    "InvalidRequestError",
    "InvalidTokensError",
    "ModelAlreadyLoadedError",
    "ModelError",
    "ModelFailedError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PayloadTooLargeError",
    "ReservationError",
    "QueueFullError",
    "RequestTimeoutError",
    "RuntimeStoppedError",
    "TierFullError",
    "UnknownTierError",
    "WorkerCrashedError",
]


class ErllamaError(Exception):
    """Root of every error erllama-py raises on purpose."""


class ConfigError(ErllamaError, ValueError):
    """A configuration value is invalid.

    Raised when the supervisor that owns the setting starts (never later, never
    as a warning). ``key`` is the full path, for example ``cache.tiers[1].quota_mb``.
    """

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class CacheError(ErllamaError):
    """The KV cache refused or failed an operation."""


class InvalidTokensError(CacheError, ValueError):
    """A token list holds an id outside ``[0, 2**32)`` or a non-integer."""


CHECKSUM_MISMATCH = "checksum_mismatch"
"""The `CacheFormatError` reason of a payload whose bytes are not the ones it was saved with."""


class CacheFormatError(CacheError):
    """A cache file or buffer failed strict parsing.

    ``reason`` is a short machine-readable tag (``bad_magic``,
    ``unsupported_version``, ``truncated``, ``trailing_bytes``,
    ``checksum_mismatch``, ``key_mismatch``, ...); ``path`` is set when the data
    came from a file. A corrupt row is never partially returned.
    """

    def __init__(self, reason: str, detail: str = "", path: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.path = path
        where = f" in {path}" if path else ""
        extra = f": {detail}" if detail else ""
        super().__init__(f"{reason}{where}{extra}")


class PayloadTooLargeError(CacheError):
    """A row would not fit in its tier even with every other row evicted."""

    def __init__(self, tier: str, size: int, quota: int) -> None:
        self.tier = tier
        self.size = size
        self.quota = quota
        super().__init__(f"row of {size} bytes exceeds the {tier} tier quota of {quota} bytes")


class TierFullError(CacheError):
    """A save found no room: evicting every unpinned row would not free enough bytes.

    Differs from `PayloadTooLargeError`: the row fits the quota, but the rest of
    the tier is pinned by readers or reserved by saves in flight. Retry later.
    """

    def __init__(self, tier: str, size: int, free: int) -> None:
        self.tier = tier
        self.size = size
        self.free = free
        super().__init__(
            f"the {tier} tier cannot make room for {size} bytes "
            f"(at most {free} bytes can be freed; the rest is pinned or being written)"
        )


class UnknownTierError(CacheError, ValueError):
    """A save, load or eviction named a tier that is not configured."""

    def __init__(self, tier: str, known: tuple[str, ...] = ()) -> None:
        self.tier = tier
        self.known = known
        hint = f" (configured: {', '.join(known)})" if known else ""
        super().__init__(f"unknown cache tier {tier!r}{hint}")


class ReservationError(CacheError):
    """The publish protocol could not reserve, or lost, the right to write a key.

    ``reason`` is ``already_present`` (an available row has this key),
    ``conflict`` (another live writer holds it) or ``expired`` (the reservation
    was cleaned up before this writer published).
    """

    def __init__(self, reason: str, key_hex: str = "") -> None:
        self.reason = reason
        self.key_hex = key_hex
        super().__init__(f"{reason}: {key_hex}" if key_hex else reason)


class ModelError(ErllamaError):
    """Something about a model, or a request to it, went wrong."""

    def __init__(self, message: str, model: str | None = None) -> None:
        self.model = model
        super().__init__(message)


class ModelNotFoundError(ModelError, KeyError):
    """No model is loaded under this name."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is not loaded", model)

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelAlreadyLoadedError(ModelError):
    """``load_model`` was called with a name that is already loaded."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is already loaded", model)


class ModelLoadError(ModelError):
    """The model file could not be loaded: missing, corrupt or unsupported.

    Nothing is left running when this is raised.
    """


class ModelFailedError(ModelError):
    """The model's worker crashed more often than its restart intensity allows.

    The model stays listed with phase ``failed``; unload and load it again.
    """


class WorkerCrashedError(ModelError):
    """The context worker process died while serving this request.

    ``exitcode`` is the exit status, or ``-signal`` when a signal killed it
    (``signal_name`` then names it). ``hung_s`` is set when the worker did not
    answer a call within its deadline of that many seconds (a wedged llama.cpp
    call, a stopped process): the runtime then killed it. The worker is
    restarted by its supervisor; resubmit the request.
    """

    def __init__(
        self,
        model: str,
        exitcode: int | None,
        request_id: str | None = None,
        *,
        hung_s: float | None = None,
    ) -> None:
        self.exitcode = exitcode
        self.request_id = request_id
        self.hung_s = hung_s
        self.signal_name: str | None = None
        if hung_s is not None:
            super().__init__(
                f"context worker of model {model!r} hung: no answer within its deadline of "
                f"{hung_s:g} s; it was killed and is being restarted",
                model,
            )
            return
        if exitcode is not None and exitcode < 0:
            try:
                self.signal_name = signal.Signals(-exitcode).name
            except ValueError:
                self.signal_name = f"signal {-exitcode}"
            how = f"killed by {self.signal_name}"
        else:
            how = f"exited with status {exitcode}"
        super().__init__(f"context worker of model {model!r} {how}", model)


class RequestTimeoutError(ModelError):
    """The request did not finish within the ``timeout`` it was given.

    Differs from `WorkerCrashedError`: the model is healthy, the request was
    slow (a long queue or a long generation). What it computed is saved as
    usual, so resubmitting it is faster.
    """

    def __init__(self, message: str, model: str | None = None, request_id: str | None = None):
        self.request_id = request_id
        super().__init__(message, model)


class QueueFullError(ModelError):
    """The model already has ``max_queue`` requests waiting for a sequence.

    Nothing was run; the model is healthy and busy. Retry after ``retry_after_s``
    seconds (an estimate, at least one second).
    """

    def __init__(self, model: str, max_queue: int, retry_after_s: float = 1.0) -> None:
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        super().__init__(
            f"model {model!r} has {max_queue} requests waiting already; retry later", model
        )


class InvalidRequestError(ModelError, ValueError):
    """The request's arguments are invalid; nothing was run.

    ``param`` names the offending argument when there is one.
    """

    def __init__(self, message: str, model: str | None = None, param: str | None = None) -> None:
        self.param = param
        super().__init__(message, model)


class ContextOverflowError(InvalidRequestError):
    """The prompt, plus room for at least one generated token, exceeds ``n_ctx``."""


class RuntimeStoppedError(ErllamaError):
    """The runtime (or the part of it this call needs) has been stopped."""
