"""What every route of one app shares: the runtime, the server settings, the metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import Request

from erllama_py.config import ServerSettings
from erllama_py.model_handle import ModelHandle
from erllama_py.results import ModelInfo
from erllama_py.runtime import Runtime
from erllama_py.server.metrics import Metrics

__all__ = ["ServerContext", "server_context"]

INFO_TTL_S = 1.0  # a model's description is read again at most this often


@dataclass
class ServerContext:
    """The app's state (``app.state.ctx``)."""

    runtime: Runtime
    settings: ServerSettings
    metrics: Metrics
    started_at: float
    _infos: dict[str, tuple[float, ModelInfo]] = field(default_factory=dict)

    def model(self, name: str) -> ModelHandle:
        """The handle of a loaded model (`ModelNotFoundError`, a 404, otherwise)."""
        return self.runtime.model(name)

    async def info(self, name: str) -> ModelInfo:
        """A model's description, cached for a second (requests read its limits)."""
        loop = asyncio.get_running_loop()
        cached = self._infos.get(name)
        now = loop.time()
        if cached is not None and now - cached[0] < INFO_TTL_S:
            self.runtime.model(name)  # still loaded?
            return cached[1]
        info = await self.runtime.model(name).ainfo()
        self._infos[name] = (now, info)
        return info


def server_context(request: Request) -> ServerContext:
    """FastAPI dependency: the app's `ServerContext`."""
    ctx = request.app.state.ctx
    assert isinstance(ctx, ServerContext)
    return ctx
