"""Run one `HttpCall` through an ASGI app in this process, yielding its answer as it comes.

The app is the replica's own `create_app(runtime)`; the answer streams back as one
`HttpStart` and then body chunks, so server-sent events reach the client as they
are produced. Closing the generator early (the client went away, Serve cancelled
the call) tells the app ``http.disconnect``, which cancels the generation, as a
dropped connection does on ``erllama-py serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from starlette.types import ASGIApp

from erllama_py.ray.messages import HttpCall, HttpStart

__all__ = ["call_app"]

log = logging.getLogger("erllama_py.ray")
Message = MutableMapping[str, Any]


def _scope(call: HttpCall) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "query_string": call.query,
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in call.headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }


async def call_app(app: ASGIApp, call: HttpCall) -> AsyncIterator[HttpStart | bytes]:
    """The app's answer to `call`: one `HttpStart`, then body chunks."""
    disconnected = asyncio.Event()
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(_scope(call), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await sent.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield HttpStart(message["status"], tuple(message.get("headers", ())))
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield bytes(chunk)
                if not message.get("more_body", False):
                    break
        try:
            await task
        except Exception:  # the app has answered (a 500 if it failed); log what it raised
            log.exception("the app raised after answering %s %s", call.method, call.path)
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
