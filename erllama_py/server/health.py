"""Liveness and readiness: ``GET /health`` answers while the process serves;
``GET /health/ready`` is 503 until every model of the configuration is loaded and its
worker runs (and while a worker restarts)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from erllama_py.server.context import ServerContext, server_context

__all__ = ["router"]

router = APIRouter(tags=["health"])
Context = Annotated[ServerContext, Depends(server_context)]


class Health(BaseModel):
    status: Literal["ok"]


class ModelReadiness(BaseModel):
    status: str
    phase: str
    worker: str


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    models: dict[str, ModelReadiness]


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The server answers."""
    return Health(status="ok")


@router.get("/health/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(ctx: Context) -> JSONResponse:
    """200 once every configured model serves; 503 before (or while a worker restarts)."""
    rt = ctx.runtime
    wanted = [m.name for m in rt.config.models]
    infos = {} if rt.stopped else {i.name: i for i in await asyncio.to_thread(rt.models)}
    models = {
        name: ModelReadiness(status=info.status, phase=str(info.phase), worker=info.worker.state)
        for name, info in infos.items()
    }
    ok = not rt.stopped and all(
        name in infos and infos[name].status == "loaded" and infos[name].worker.state == "running"
        for name in wanted
    )
    body = Readiness(status="ready" if ok else "not_ready", models=models)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
