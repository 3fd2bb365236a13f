"""Calling the meta actor by name, so a restart never leaves a caller with a stale ref."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pykka
from pykka.messages import ProxyCall

from erllama_py.cache.ramstore import RamEntry
from erllama_py.cache.rows import RowInfo
from erllama_py.cache.shared import META_NAME, CacheShared
from erllama_py.errors import RuntimeStoppedError

__all__ = ["ASK_TIMEOUT_S", "MetaClient", "meta_client"]

ASK_TIMEOUT_S = 60.0


def meta_client(shared: CacheShared) -> MetaClient:
    """A client for the meta actor of this cache."""
    return MetaClient(shared)


class MetaClient:
    """Calls the meta actor by name, so a restart never leaves a caller with a stale ref.

    Implements `erllama_py.cache.writer.MetaPort`. Each call is one message,
    answered within `timeout` seconds.
    """

    def __init__(self, shared: CacheShared, timeout: float = ASK_TIMEOUT_S) -> None:
        self.shared = shared
        self.timeout = timeout

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

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a meta actor method and wait for its answer (one retry across a restart).

        Sends Pykka's proxy-call message directly: building a proxy per call
        costs more than the call itself.
        """
        message = ProxyCall(attr_path=(method,), args=args, kwargs=kwargs)
        for attempt in (1, 2):
            try:
                return self._ref().ask(message, block=True, timeout=self.timeout)
            except pykka.ActorDeadError:
                if attempt == 2:
                    raise RuntimeStoppedError("the cache's meta actor stopped") from None
        raise AssertionError("unreachable")

    def tell(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call without waiting for the answer (fire and forget)."""
        with contextlib.suppress(pykka.ActorDeadError, RuntimeStoppedError):
            self._ref().tell(ProxyCall(attr_path=(method,), args=args, kwargs=kwargs))

    def reserve(self, key: bytes, tier: str, **kwargs: Any) -> int:
        return int(self.call("reserve", key, tier, **kwargs))

    def set_temp_path(self, key: bytes, tier: str, token: int, path: Path) -> None:
        self.call("set_temp_path", key, tier, token, path)

    def check_reservation(self, key: bytes, tier: str, token: int) -> None:
        self.call("check_reservation", key, tier, token)

    def mark_published(self, key: bytes, tier: str, token: int, path: Path) -> None:
        self.call("mark_published", key, tier, token, path)

    def announce(self, key: bytes, tier: str, token: int, **kwargs: Any) -> RowInfo:
        info: RowInfo = self.call("announce", key, tier, token, **kwargs)
        return info

    def cancel(self, key: bytes, tier: str, token: int) -> None:
        self.call("cancel", key, tier, token)

    def adopt_file(self, tier: str, key: bytes, path: Path) -> RowInfo | None:
        info: RowInfo | None = self.call("adopt_file", tier, key, path)
        return info

    def store_ram(self, entry: RamEntry, tier: str) -> RowInfo:
        info: RowInfo = self.call("store_ram", entry, tier)
        return info

    def tier_kind(self, tier: str) -> str:
        return self.shared.index().tier_settings(self.shared.index().resolve_tier(tier)).kind
