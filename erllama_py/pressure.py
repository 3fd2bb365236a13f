"""The memory-pressure poller (spec 5.14): evicts cache rows when memory runs short.

Every ``interval_ms`` it samples used/total memory (psutil, or a source given
by the caller); at or above ``high_watermark`` it evicts least recently used
rows of ``evict_tiers`` (RAM rows are demoted to a slower tier when demotion is
on) until memory is back to ``low_watermark``, and at least ``min_evict_bytes``.
Off by default.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import pykka

from erllama_py.cache.handle import CacheHandle
from erllama_py.config import PressureSettings
from erllama_py.timers import stop_timer
from supervisors import SupervisedActor

__all__ = ["PRESSURE_NAME", "PressureActor", "PressureCheck", "eviction_target", "system_memory"]

PRESSURE_NAME = "pressure"
Source = Callable[[], tuple[int, int]]


def system_memory() -> tuple[int, int]:
    """(used, total) bytes of the machine's memory; 'used' excludes reclaimable cache."""
    vm = psutil.virtual_memory()
    return max(vm.total - vm.available, 0), vm.total


def eviction_target(used: int, total: int, settings: PressureSettings) -> int:
    """Bytes to free: 0 below the high watermark, else enough to reach the low one."""
    if total <= 0 or used / total < settings.high_watermark:
        return 0
    return max(used - int(settings.low_watermark * total), settings.min_evict_bytes)


@dataclass(frozen=True)
class PressureCheck:
    """The outcome of one check."""

    used: int
    total: int
    target: int
    evicted_rows: int
    evicted_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "used": self.used,
            "total": self.total,
            "ratio": self.used / self.total if self.total else 0.0,
            "target": self.target,
            "evicted_rows": self.evicted_rows,
            "evicted_bytes": self.evicted_bytes,
        }


class _Check:
    pass


class PressureActor(SupervisedActor):
    """Polls memory on a timer and evicts when over the high watermark."""

    def __init__(
        self, settings: PressureSettings, cache: CacheHandle, source: Source | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.cache = cache
        self.source = source or system_memory
        self.last: PressureCheck | None = None
        self._timer: threading.Timer | None = None

    def on_start(self) -> None:
        self._arm()

    def on_stop(self) -> None:
        stop_timer(self._timer)

    def on_failure(self, *_exc_info: Any) -> None:
        self.on_stop()

    def _arm(self) -> None:
        ref = self.actor_ref

        def fire() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(_Check())

        self._timer = threading.Timer(self.settings.interval_ms / 1000.0, fire)
        self._timer.daemon = True
        self._timer.start()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Check):
            self.check()
            self._arm()
            return None
        return super().on_receive(message)

    def check(self) -> PressureCheck:
        """Sample now and evict if needed."""
        used, total = self.source()
        target = eviction_target(used, total, self.settings)
        rows = freed = 0
        if target:
            rows, freed = self.cache.evict_bytes(target, list(self.settings.evict_tiers))
        self.last = PressureCheck(used, total, target, rows, freed)
        return self.last

    def status(self) -> dict[str, Any]:
        """Settings and the last check."""
        return {
            "interval_ms": self.settings.interval_ms,
            "high_watermark": self.settings.high_watermark,
            "low_watermark": self.settings.low_watermark,
            "evict_tiers": list(self.settings.evict_tiers),
            "last": self.last.to_dict() if self.last else None,
            "sampled_at": time.time(),
        }
