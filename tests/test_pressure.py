"""The memory-pressure poller: the eviction target rule and the actor on a fake source."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import erllama_py.cache as cache_api
from erllama_py.cache.handle import CacheHandle
from erllama_py.config import PressureSettings
from erllama_py.pressure import PressureActor, eviction_target

NS = cache_api.Namespace(fingerprint=b"\x05" * 32, quant="f16", ctx_hash=b"\x06" * 16)
SETTINGS = PressureSettings(
    enabled=True, interval_ms=3_600_000, high_watermark=0.8, low_watermark=0.5, min_evict_bytes=10
)


class FakeMemory:
    def __init__(self, used: int, total: int) -> None:
        self.used = used
        self.total = total

    def __call__(self) -> tuple[int, int]:
        return self.used, self.total


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[CacheHandle]:
    handle = cache_api.start(
        {
            "tiers": [
                {"kind": "ram", "quota_mb": 8},
                {"kind": "disk", "root": str(tmp_path / "disk"), "quota_mb": 8},
            ]
        }
    )
    yield handle
    handle.stop()


def test_no_eviction_below_the_high_watermark() -> None:
    assert eviction_target(79, 100, SETTINGS) == 0


def test_eviction_brings_memory_back_to_the_low_watermark() -> None:
    assert eviction_target(90, 100, SETTINGS) == 40


def test_eviction_frees_at_least_min_evict_bytes() -> None:
    assert eviction_target(8_000, 10_000, SETTINGS) == 3_000
    settings = PressureSettings(high_watermark=0.8, low_watermark=0.79, min_evict_bytes=500)
    assert eviction_target(800, 1000, settings) == 500


def test_an_unknown_total_never_evicts() -> None:
    assert eviction_target(10, 0, SETTINGS) == 0


@given(
    used=st.integers(0, 10**12),
    total=st.integers(1, 10**12),
)
def test_eviction_target_is_zero_exactly_below_high_watermark(used: int, total: int) -> None:
    target = eviction_target(used, total, SETTINGS)
    if used / total < SETTINGS.high_watermark:
        assert target == 0
    else:
        assert target >= SETTINGS.min_evict_bytes
        assert target >= used - int(SETTINGS.low_watermark * total)


def test_pressure_evicts_ram_rows_and_leaves_disk_rows_by_default(cache: CacheHandle) -> None:
    ram_keys = [cache.save(NS, [i, i + 1], b"r" * 1000, tier="ram") for i in range(3)]
    disk_key = cache.save(NS, [99], b"d" * 1000, tier="disk")
    memory = FakeMemory(used=95_000, total=100_000)
    settings = PressureSettings(
        enabled=True, interval_ms=3_600_000, min_evict_bytes=1, evict_tiers=("ram",)
    )
    ref = PressureActor.start(settings, cache, memory)
    try:
        check = ref.proxy().check().get(timeout=10)
        assert check.target > 0
        assert check.evicted_rows == 3
        assert all(
            cache.lookup_key(k) is None or cache.lookup_key(k).tier != "ram" for k in ram_keys
        )
        assert cache.lookup_key(disk_key) is not None
        assert ref.proxy().status().get(timeout=10)["last"]["evicted_rows"] == check.evicted_rows
    finally:
        ref.stop()
    assert cache.check() == []


def test_pressure_below_the_watermark_does_nothing(cache: CacheHandle) -> None:
    key = cache.save(NS, [1, 2, 3], b"x" * 100, tier="ram")
    ref = PressureActor.start(SETTINGS, cache, FakeMemory(used=10, total=100))
    try:
        check = ref.proxy().check().get(timeout=10)
        assert (check.target, check.evicted_rows) == (0, 0)
        assert cache.lookup_key(key) is not None
    finally:
        ref.stop()
