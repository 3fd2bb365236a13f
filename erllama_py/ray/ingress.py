"""`ErllamaIngress`: Serve's FastAPI ingress in front of the replicas.

Every request but the ``/ray/*`` pages is forwarded, as it came, to one replica's
OpenAI app through a Serve deployment handle. Before that, the ingress computes the
request's affinity key (`erllama_py.ray.affinity`, from the JSON body), which
Serve's request router (`CacheAffinityRouter`) reads to pick the replica. A replica
that dies while it holds a request fails that request with a clear 503 (or, once a
stream has started, a final error frame in OpenAI's envelope, then ``[DONE]``);
Serve restarts the replica and later requests succeed.

- ``GET /ray/status``: every replica, its node, slot, pid, tier roots, cache counters
  and models.
- ``GET /metrics``: every replica's Prometheus metrics, labelled ``replica``.
"""

# No `from __future__ import annotations`: Serve re-signs these methods, and FastAPI must
# resolve their annotations (Request) as objects.

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from erllama_py.config import RaySettings
from erllama_py.ray.affinity import affinity_key, prompt_bytes
from erllama_py.ray.merged_metrics import merge_metrics
from erllama_py.ray.messages import HttpCall, HttpStart, ReplicaStatus
from erllama_py.server.errors import Failure, error_body
from erllama_py.server.metrics import CONTENT_TYPE

__all__ = ["ErllamaIngress", "api"]

log = logging.getLogger("erllama_py.ray")
STATUS_TIMEOUT_S = 30.0
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]

api = FastAPI(title="erllama-py on Ray Serve", docs_url=None, redoc_url=None)


def _replica_failed(exc: BaseException) -> Failure:
    return Failure(
        503, "server_error",
        f"the replica serving this request failed ({type(exc).__name__}); Serve restarts "
        "it, retry the request",
        "replica_failed", retry_after_s=1,
    )  # fmt: skip


def _failure_response(failure: Failure) -> JSONResponse:
    return JSONResponse(error_body(failure), failure.status, headers=failure.headers())


def _is_event_stream(start: HttpStart) -> bool:
    return any(
        k.lower() == b"content-type" and v.startswith(b"text/event-stream")
        for k, v in start.headers
    )


@serve.ingress(api)
class ErllamaIngress:
    """Forwards HTTP requests to the replica deployment, keyed for cache affinity."""

    def __init__(self, replicas: DeploymentHandle[Any], settings: RaySettings) -> None:
        self._replicas = replicas
        self._settings = settings

    def _key(self, body: bytes) -> tuple[str, ...]:
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            return ()
        if not isinstance(parsed, dict):
            return ()
        s = self._settings
        return affinity_key(prompt_bytes(parsed), s.affinity_block_chars, s.affinity_max_blocks)

    @api.get("/ray/status")
    async def status(self) -> JSONResponse:
        """Every replica with its node, slot, tier roots, cache counters and models."""
        results = await self._replicas.broadcast("status").results_async(
            timeout_s=STATUS_TIMEOUT_S, return_exceptions=True
        )
        replicas = [r.to_dict() for r in results if isinstance(r, ReplicaStatus)]
        errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        return JSONResponse({"replicas": replicas, "errors": errors})

    @api.get("/metrics")
    async def metrics(self) -> Response:
        """Every replica's Prometheus metrics, each sample labelled with its replica."""
        results = await self._replicas.broadcast("metrics_text").results_async(
            timeout_s=STATUS_TIMEOUT_S, return_exceptions=True
        )
        pairs = [r for r in results if isinstance(r, tuple)]
        return Response(merge_metrics(pairs), media_type=CONTENT_TYPE)

    @api.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
    async def forward(self, request: Request, path: str) -> Response:
        """One request, answered by the replica the router picks."""
        body = await request.body()
        call = HttpCall(
            method=request.method,
            path="/" + path,
            query=request.url.query.encode(),
            headers=tuple(request.headers.raw),
            body=body,
            affinity=self._key(body) if request.method == "POST" and body else (),
        )
        gen = self._replicas.options(stream=True).handle_http.remote(call)
        assert isinstance(gen, DeploymentResponseGenerator)
        try:
            start = await gen.__anext__()
        except (RayError, StopAsyncIteration) as exc:
            log.warning("replica failed before answering %s %s: %r", call.method, call.path, exc)
            return _failure_response(_replica_failed(exc))
        assert isinstance(start, HttpStart)
        if not _is_event_stream(start):
            chunks: list[bytes] = []
            try:
                async for chunk in gen:
                    chunks.append(chunk)
            except RayError as exc:
                log.warning("replica failed answering %s %s: %r", call.method, call.path, exc)
                return _failure_response(_replica_failed(exc))
            response = Response(b"".join(chunks), status_code=start.status)
            response.raw_headers = list(start.headers)
            return response

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in gen:
                    yield chunk
            except RayError as exc:
                log.warning("replica failed streaming %s %s: %r", call.method, call.path, exc)
                frame = json.dumps(error_body(_replica_failed(exc)))
                yield f"data: {frame}\n\ndata: [DONE]\n\n".encode()

        response = StreamingResponse(events(), status_code=start.status)
        response.raw_headers = [(k, v) for k, v in start.headers if k.lower() != b"content-length"]
        return response
