"""The ASGI app: one FastAPI application per runtime, one router per API family.

``create_app(rt)`` builds it on a running runtime (a test builds a server in one
line). Where errors go: the routes raise; `ApiKeys`, `BodyLimit` and
`RequestContext` wrap everything (ids, the access log, metrics, 401, 413);
FastAPI's exception handlers map our errors to each family's envelope and status
(`erllama_py.server.errors`: OpenAI's, or Anthropic's under ``/v1/messages``);
anything unexpected becomes a logged 500 without a trace.
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException

import erllama_py
from erllama_py.config import ServerSettings
from erllama_py.errors import ErllamaError
from erllama_py.runtime import Runtime
from erllama_py.server import anthropic_api, health, openai_api
from erllama_py.server.context import ServerContext
from erllama_py.server.errors import (
    ApiError,
    api_error_handler,
    erllama_error_handler,
    http_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from erllama_py.server.metrics import CONTENT_TYPE, Metrics
from erllama_py.server.middleware import ApiKeys, BodyLimit, RequestContext

__all__ = ["create_app"]


def create_app(
    runtime: Runtime, settings: ServerSettings | None = None, metrics: Metrics | None = None
) -> FastAPI:
    """The HTTP app serving `runtime` (settings default to the runtime's ``server:``)."""
    settings = settings or runtime.config.server
    metrics = metrics or Metrics(runtime)
    app = FastAPI(
        title="erllama-py",
        version=erllama_py.__version__,
        description="llama.cpp models behind an OpenAI-compatible API, with a token-exact "
        "tiered KV cache (usage.prompt_tokens_details.cached_tokens shows it at work).",
    )
    app.state.ctx = ServerContext(runtime, settings, metrics, started_at=time.time())
    app.include_router(openai_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(health.router)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (text format)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def openapi() -> dict[str, object]:
        # Validation errors are answered as 400s in OpenAI's envelope, never FastAPI's 422.
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(ErllamaError, erllama_error_handler)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=[
                "authorization",
                "content-type",
                "x-request-id",
                "x-api-key",
                "anthropic-version",
                "anthropic-beta",
            ],
            expose_headers=["x-request-id", "request-id", "retry-after"],
        )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeys, keys=settings.api_keys)
    app.add_middleware(RequestContext, metrics=metrics)  # outermost: it sees every answer
    return app
