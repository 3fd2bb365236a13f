"""How errors reach an OpenAI client: one table from our error classes to a status, an
error type and a code, and the handlers that render OpenAI's envelope.

Route functions do not catch broad exceptions: an `ErllamaError` propagates to
`erllama_error_handler`, a validation error to `validation_error_handler`, a
routing error (404, 405) to `http_error_handler`, and anything else to
`unexpected_error_handler`, which logs it and answers a 500 without a trace.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request

from erllama_py.errors import (
    ConfigError,
    ContextOverflowError,
    ErllamaError,
    InvalidRequestError,
    ModelAlreadyLoadedError,
    ModelError,
    ModelFailedError,
    ModelLoadError,
    ModelNotFoundError,
    QueueFullError,
    RequestTimeoutError,
    RuntimeStoppedError,
    WorkerCrashedError,
)

__all__ = [
    "ApiError",
    "Failure",
    "anthropic_error_body",
    "anthropic_status",
    "erllama_error_handler",
    "error_body",
    "failure_of",
    "http_error_handler",
    "is_anthropic",
    "respond",
    "unexpected_error_handler",
    "validation_error_handler",
]

log = logging.getLogger("erllama_py.server")
RETRY_AFTER_S = 1  # advised when a model is busy or restarting its worker


@dataclass(frozen=True)
class Failure:
    """What a client is told: status, OpenAI error type, code, message, parameter."""

    status: int
    type: str
    message: str
    code: str | None = None
    param: str | None = None
    retry_after_s: float | None = None

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}


class ApiError(Exception):
    """A failure the server itself decides (a field it refuses, a missing key...)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


# Most specific first: the first class an error is an instance of decides.
_TABLE: tuple[tuple[type[ErllamaError], int, str, str | None, float | None], ...] = (
    (ContextOverflowError, 400, "invalid_request_error", "context_length_exceeded", None),
    (InvalidRequestError, 400, "invalid_request_error", None, None),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found", None),
    (QueueFullError, 429, "rate_limit_error", "queue_full", RETRY_AFTER_S),
    (RequestTimeoutError, 504, "timeout_error", "request_timeout", None),
    (WorkerCrashedError, 503, "server_error", "worker_crashed", RETRY_AFTER_S),
    (ModelFailedError, 503, "server_error", "model_failed", None),
    (ModelLoadError, 503, "server_error", "model_not_loaded", RETRY_AFTER_S),
    (ModelAlreadyLoadedError, 409, "invalid_request_error", "model_already_loaded", None),
    (RuntimeStoppedError, 503, "server_error", "shutting_down", RETRY_AFTER_S),
    (ConfigError, 400, "invalid_request_error", "invalid_config", None),
    (ModelError, 500, "server_error", "model_error", None),
)


def failure_of(exc: ErllamaError) -> Failure:
    """The client's view of one of our errors."""
    for cls, status, kind, code, retry in _TABLE:
        if isinstance(exc, cls):
            param = getattr(exc, "param", None)
            after = exc.retry_after_s if isinstance(exc, QueueFullError) else retry
            return Failure(status, kind, str(exc), code, param, after)
    return Failure(500, "server_error", str(exc), "internal_error")


def error_body(failure: Failure) -> dict[str, dict[str, str | None]]:
    """OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": failure.message,
            "type": failure.type,
            "param": failure.param,
            "code": failure.code,
        }
    }


def is_anthropic(path: str) -> bool:
    """Whether ``path`` is the Anthropic family's (its errors have Anthropic's envelope)."""
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_status(status: int) -> int:
    """Anthropic's status for ours: a full queue (429) or a model restarting (503) is its
    529 ``overloaded_error``."""
    return 529 if status in (429, 503) else status


def anthropic_error_body(failure: Failure, request_id: str | None) -> dict[str, object]:
    """Anthropic's envelope: ``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    status = anthropic_status(failure.status)
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {
        "type": "error",
        "error": {"type": kind, "message": failure.message},
        "request_id": request_id,
    }


def respond(failure: Failure, path: str, request_id: str | None) -> JSONResponse:
    """The error response for a request to ``path``, in its API family's envelope."""
    if is_anthropic(path):
        headers = failure.headers()
        status = anthropic_status(failure.status)
        if status == 529 and "retry-after" not in headers:
            headers["retry-after"] = str(RETRY_AFTER_S)
        return JSONResponse(anthropic_error_body(failure, request_id), status, headers=headers)
    return JSONResponse(error_body(failure), failure.status, headers=failure.headers())


def _respond(failure: Failure, request: Request | None = None) -> JSONResponse:
    if request is None:
        return JSONResponse(error_body(failure), failure.status, headers=failure.headers())
    request_id = request.scope.get("state", {}).get("request_id")
    return respond(failure, request.url.path, request_id)


async def erllama_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ErllamaError)
    failure = failure_of(exc)
    if failure.status >= 500:
        log.warning("request failed: %s: %s", type(exc).__name__, exc)
    return _respond(failure, request)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _respond(exc.failure, request)


def _param(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for part in parts:
        if part.isdigit():
            out += f"[{part}]"
        elif part.startswith(("str", "list", "function-", "tagged-union")) or part in (
            "int",
            "float",
            "bool",
        ):
            continue  # pydantic's union branch names
        else:
            out += f".{part}" if out else part
    return out or "body"


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A wrong type, an out-of-range value or malformed JSON: 400 with ``param`` set."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = tuple(first.get("loc", ("body",)))
    if first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
        param = None
    else:
        param = _param(loc)
        message = f"{param}: {first.get('msg', 'invalid value')}"
    return _respond(Failure(400, "invalid_request_error", message, "invalid_value", param), request)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors (404 unknown path, 405 wrong method) in OpenAI's envelope."""
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    codes = {404: "not_found", 405: "method_not_allowed"}
    failure = Failure(exc.status_code, kind, str(exc.detail), codes.get(exc.status_code))
    headers = dict(exc.headers or {})
    if is_anthropic(request.url.path):
        return _respond(failure, request)
    return JSONResponse(error_body(failure), exc.status_code, headers=headers)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its trace, answered as a plain 500."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    failure = Failure(500, "server_error", "internal server error", "internal_error")
    return _respond(failure, request)
