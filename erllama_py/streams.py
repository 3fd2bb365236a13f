"""Streamed completions: `EventStream` (a blocking iterator) and `AsyncEventStream`.

Both yield `Delta` events, then one `Done` carrying the `Completion`; an error
ends the stream by raising. Closing a stream early (``close()`` / ``aclose()``,
leaving a ``with`` block, or dropping the last reference) cancels its request,
which frees its sequence and pins at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Callable, Iterator

from erllama_py.model.request import Failure, Request, SinkEvent
from erllama_py.results import Completion, Done, StreamEvent

__all__ = ["AsyncEventStream", "EventStream"]

POLL_S = 0.5  # how often a blocked reader checks that the runtime still runs


class _Stream:
    def __init__(self, request: Request, cancel: Callable[[Request], None]) -> None:
        self._request = request
        self._cancel = cancel
        self._finished = False
        self.completion: Completion | None = None
        """The final `Completion`, once the `Done` event has been read."""

    @property
    def request_id(self) -> str:
        return self._request.id

    def _take(self, event: SinkEvent) -> StreamEvent:
        if isinstance(event, Failure):
            self._finished = True
            raise event.error
        if isinstance(event, Done):
            self._finished = True
            self.completion = event.completion
        return event

    def _close(self) -> None:
        self._finished = True
        self._cancel(self._request)

    def __del__(self) -> None:
        if not self._finished:
            with contextlib.suppress(Exception):
                self._close()


class EventStream(_Stream, Iterator[StreamEvent]):
    """The events of a streamed request, read with a blocking ``for`` loop."""

    def __init__(
        self,
        request: Request,
        cancel: Callable[[Request], None],
        check_running: Callable[[], None],
    ) -> None:
        super().__init__(request, cancel)
        self._check_running = check_running

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> StreamEvent:
        if self._finished:
            raise StopIteration
        try:
            while True:
                try:
                    event = self._request.sink.events.get(timeout=POLL_S)
                except queue.Empty:
                    self._check_running()
                    continue
                return self._take(event)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancel the request if it is still running (idempotent)."""
        self._close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncEventStream(_Stream, AsyncIterator[StreamEvent]):
    """The events of a streamed request, read with ``async for``; never blocks the loop."""

    def __init__(
        self,
        request: Request,
        events: asyncio.Queue[SinkEvent],
        cancel: Callable[[Request], None],
    ) -> None:
        super().__init__(request, cancel)
        self._events = events

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            return self._take(await self._events.get())
        except BaseException:
            self._close()
            raise

    async def aclose(self) -> None:
        """Cancel the request if it is still running (idempotent)."""
        self._close()

    def cancel(self) -> None:
        """Ask the request to end now but keep the stream readable: its `Done` follows
        (finish reason ``cancelled``; the state is saved as at any finish)."""
        if not self._finished:
            self._cancel(self._request)

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._close()
