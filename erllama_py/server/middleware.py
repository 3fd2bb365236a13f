"""The ASGI layers around the routes, outermost first.

- `RequestContext`: a request id (``x-request-id``, minted when absent) on every
  response and in the access log, the per-request metrics, and a ``server-timing``
  header: ``app`` is the time from the request's arrival to its response's start
  (for a JSON answer, all of it but the body's send), ``lib`` the time a route spent
  in the runtime's API when it set ``request.state.library_ms``; their difference is
  what the HTTP layer costs (bench/http_serving.py reads it).
- `ApiKeys`: when keys are configured, every path but ``/health*`` needs
  ``Authorization: Bearer <key>`` (or ``x-api-key``), compared in constant time.
- `BodyLimit`: a body over the cap is a 413, whether it announces its length or comes
  chunked (then it is read here, up to the cap, before the app sees it).

They are plain ASGI middlewares (no per-request task or buffering), so a warm
request pays microseconds for them.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from erllama_py.server.errors import (
    Failure,
    anthropic_error_body,
    anthropic_status,
    error_body,
    is_anthropic,
)
from erllama_py.server.metrics import Metrics

__all__ = ["ApiKeys", "BodyLimit", "RequestContext"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("erllama_py.server.access")
OPEN_PATHS = ("/health", "/health/ready")


async def _send_failure(send: Send, failure: Failure, scope: Scope | None = None) -> None:
    path = str(scope.get("path", "")) if scope is not None else ""
    request_id = scope.get("state", {}).get("request_id") if scope is not None else None
    status = failure.status
    if is_anthropic(path):
        body = json.dumps(anthropic_error_body(failure, request_id)).encode()
        status = anthropic_status(status)
    else:
        body = json.dumps(error_body(failure)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if failure.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="erllama-py"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class RequestContext:
    """Request ids, the access log and request metrics (see the module docstring)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and len(given) <= 200 else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        raw_id = request_id.encode("latin-1", errors="replace")

        anthropic = is_anthropic(str(scope.get("path", "")))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", raw_id))
                if anthropic:  # what Anthropic's SDKs read
                    headers.append((b"request-id", raw_id))
                headers.append((b"server-timing", _server_timing(scope, started)))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            path = scope.get("path", "")
            endpoint = _endpoint(scope)
            self.metrics.observe_request(endpoint, status, elapsed)
            access_log.info(
                '%s "%s %s" %d %.1f ms %s',
                _client(scope),
                scope.get("method", ""),
                path,
                status,
                elapsed * 1000.0,
                request_id,
            )


def _server_timing(scope: Scope, started: float) -> bytes:
    timing = b"app;dur=%.3f" % ((time.perf_counter() - started) * 1000.0)
    library_ms = scope.get("state", {}).get("library_ms")
    if isinstance(library_ms, float):
        timing += b", lib;dur=%.3f" % library_ms
    return timing


def _endpoint(scope: Scope) -> str:
    """The route's path template (``/v1/models/{model_id}``), never the raw path, so that
    metric labels stay few."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    return str(template) if template else "unmatched"


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


class ApiKeys:
    """Bearer keys, compared in constant time; ``/health`` stays open."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope: Scope) -> bool:
        given = _header(scope, b"authorization") or ""
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        token = token or (_header(scope, b"x-api-key") or "")
        raw = token.encode("latin-1", errors="replace")
        ok = False
        for key in self.keys:  # every key is compared: the time says nothing of which matched
            ok |= hmac.compare_digest(raw, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "OPTIONS" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        message = "a valid API key is required (Authorization: Bearer <key>, or x-api-key)"
        failure = Failure(401, "invalid_request_error", message, "invalid_api_key")
        await _send_failure(send, failure, scope)


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with a 413 (by their length, or as they stream)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _failure(self) -> Failure:
        message = f"the request body is larger than the limit of {self.max_bytes} bytes"
        return Failure(413, "invalid_request_error", message, "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_failure(send, self._failure(), scope)
            return
        if length is not None:
            await self.app(scope, receive, send)
            return
        # No length announced (a chunked body): read it here, up to the cap, then replay it.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = bytes(message.get("body", b""))
            seen += len(chunk)
            if seen > self.max_bytes:
                await _send_failure(send, self._failure(), scope)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
