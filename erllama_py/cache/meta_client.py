"""Calling the meta actor by name, typed by the actor's own methods.

The meta actor's API is declared once, as the methods of `MetaActor`. A
client forwards calls to them: ``client.ask.reserve(key, tier, ...)`` waits
for the answer, ``client.tell.checkin(holder)`` does not. Both attributes are
typed as the actor itself, so mypy checks every call's arguments and result
against the method it reaches; at run time each call is one Pykka
`ProxyCall` message to whichever incarnation of the actor is registered
under ``cache_meta``, so a restart never leaves a caller with a stale
reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import pykka
from pykka.messages import ProxyCall

from erllama_py.cache.state import META_NAME, CacheState
from erllama_py.errors import RuntimeStoppedError

if TYPE_CHECKING:
    from erllama_py.cache.meta import MetaActor

__all__ = ["ASK_TIMEOUT_S", "MetaClient", "meta_client"]

ASK_TIMEOUT_S = 60.0

_Send = Callable[[str, tuple[object, ...], Mapping[str, object]], object]


class _Forward:
    """Turns ``forward.method(*args, **kwargs)`` into ``send("method", args, kwargs)``."""

    __slots__ = ("_send",)

    def __init__(self, send: _Send) -> None:
        self._send = send

    def __getattr__(self, name: str) -> Callable[..., object]:
        if name.startswith("_"):
            raise AttributeError(name)
        send = self._send

        def call(*args: object, **kwargs: object) -> object:
            return send(name, args, kwargs)

        return call


def meta_client(shared: CacheState) -> MetaClient:
    """A client for the meta actor of this cache."""
    return MetaClient(shared)


class MetaClient:
    """Forwards calls to the meta actor registered under ``cache_meta`` (see the module doc).

    Each call is one message, answered within `timeout` seconds; an ``ask``
    is retried once across a restart of the actor.
    """

    def __init__(self, shared: CacheState, timeout: float = ASK_TIMEOUT_S) -> None:
        self.shared = shared
        self.timeout = timeout

    @property
    def ask(self) -> MetaActor:
        """The actor's methods, called and waited for."""
        return cast("MetaActor", _Forward(self._ask))

    @property
    def tell(self) -> MetaActor:
        """The actor's methods, called without waiting (their results are dropped)."""
        return cast("MetaActor", _Forward(self._tell))

    def _ref(self) -> pykka.ActorRef[Any]:
        if self.shared.stopped:
            raise RuntimeStoppedError("the cache has been stopped")
        ref = self.shared.registry.whereis(META_NAME)
        if ref is None:
            try:
                ref = self.shared.registry.wait_for(META_NAME, self.timeout)
            except Exception as exc:
                raise RuntimeStoppedError("the cache's meta actor is not running") from exc
        assert isinstance(ref, pykka.ActorRef)
        return ref

    def _ask(self, method: str, args: tuple[object, ...], kwargs: Mapping[str, object]) -> object:
        # Pykka's proxy-call message, sent directly: a proxy per call costs more than the call.
        message = ProxyCall(attr_path=(method,), args=args, kwargs=dict(kwargs))
        for attempt in (1, 2):
            try:
                return self._ref().ask(message, block=True, timeout=self.timeout)
            except pykka.ActorDeadError:
                if attempt == 2:
                    raise RuntimeStoppedError("the cache's meta actor stopped") from None
            except pykka.Timeout:
                raise RuntimeStoppedError(
                    f"the cache's meta actor did not answer {method} in {self.timeout:g} s"
                ) from None
        raise AssertionError("unreachable")

    def _tell(self, method: str, args: tuple[object, ...], kwargs: Mapping[str, object]) -> None:
        message = ProxyCall(attr_path=(method,), args=args, kwargs=dict(kwargs))
        with contextlib.suppress(pykka.ActorDeadError, RuntimeStoppedError):
            self._ref().tell(message)
