"""A request's ``timeout`` holds even when its model actor cannot act on it.

The model actor ends a request whose timeout passed at the next tick; but a
tick blocked in a worker that stopped answering comes only when that worker's
own deadline kills it, which may be much later. The watchdog is the backstop:
one daemon thread for the process, holding the deadlines of the requests that
have one, that fails a request still running `GRACE_S` after its timeout with
`RequestTimeoutError` and asks its actor to cancel it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from erllama_py.errors import RequestTimeoutError
from erllama_py.model.request import Request

__all__ = ["GRACE_S", "watch"]

# Past its timeout, the actor has this long to end a request itself (its state is then
# saved as usual) before the watchdog fails it. A generous margin: an actor ends a
# timed-out request at the end of the tick in progress, which is one step of the worker.
GRACE_S = 2.0


@dataclass(order=True)
class _Entry:
    due: float
    seq: int
    # Dropped as soon as the request ends: a waiting entry must not keep its runtime alive.
    request: Request | None = field(compare=False)
    model: str = field(compare=False)
    cancel: Callable[[], None] | None = field(compare=False)

    def forget(self, _future: object = None) -> None:
        self.request = None
        self.cancel = None


class _Watchdog:
    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, request: Request, model: str, cancel: Callable[[], None]) -> None:
        deadline = request.deadline
        if deadline is None:
            return
        entry = _Entry(deadline + GRACE_S, next(self._ids), request, model, cancel)
        request.sink.future.add_done_callback(entry.forget)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="erllama-request-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                entry = self._heap[0]
                wait = entry.due - time.perf_counter()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            self._expire(entry)

    @staticmethod
    def _expire(entry: _Entry) -> None:
        request, cancel = entry.request, entry.cancel
        if request is None or cancel is None or request.sink.done:
            return
        timeout = request.options.timeout_s or 0.0
        request.sink.fail(
            RequestTimeoutError(
                f"request {request.id} did not finish within its timeout of {timeout:g} s "
                "(its model did not end it: its worker may have stopped answering)",
                entry.model,
                request_id=request.id,
            )
        )
        try:
            cancel()
        except Exception:  # the model may be gone; the caller has its answer
            return


_WATCHDOG = _Watchdog()


def watch(request: Request, model: str, cancel: Callable[[], None]) -> None:
    """Fail `request` if it is still running `GRACE_S` after its timeout (if it has one)."""
    _WATCHDOG.add(request, model, cancel)
