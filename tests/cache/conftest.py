"""Fixtures for the tests of the running cache: caches on tmp roots, always stopped.

A tmp directory stands in for the tmpfs of a ``ram_file`` tier. Quotas are small so
that eviction, demotion and refusals happen with payloads of a few kilobytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

import erllama_py.cache
from erllama_py.cache import CacheHandle, Namespace, ctx_params_hash
from erllama_py.config import CacheSettings, TierSettings

KB = 1024
MB = 1024 * KB

# Quotas of the `cache` fixture (whole MB: it goes through the sys.yaml mapping).
RAM_QUOTA_MB = 4
RAM_FILE_QUOTA_MB = 8
DISK_QUOTA_MB = 16


class MakeCache(Protocol):
    """Start a cache whose tiers have these byte quotas (None leaves the tier out)."""

    def __call__(
        self,
        *,
        ram: int | None = ...,
        ram_file: int | None = ...,
        disk: int | None = ...,
        roots: Mapping[str, Path] | None = ...,
        **settings: Any,
    ) -> CacheHandle: ...


class WaitUntil(Protocol):
    """Poll `predicate` until it is true; fail the test with `what` after `timeout` s."""

    def __call__(
        self, predicate: Callable[[], object], what: str, timeout: float = ...
    ) -> None: ...


@pytest.fixture
def ns() -> Namespace:
    """The namespace of a small, imaginary model."""
    return Namespace(
        fingerprint=bytes(range(32)),
        quant="q4_k_m",
        ctx_hash=ctx_params_hash(n_ctx=4096, type_k="f16", type_v="f16"),
    )


@pytest.fixture
def other_ns() -> Namespace:
    """Another model's namespace: its rows never match `ns`'s."""
    return Namespace(
        fingerprint=bytes(range(32, 64)),
        quant="q4_k_m",
        ctx_hash=ctx_params_hash(n_ctx=4096, type_k="f16", type_v="f16"),
    )


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """Roots of the file tiers: ``ram_file`` (a tmp dir standing in for tmpfs) and ``disk``."""
    return {"ram_file": tmp_path / "ramfile", "disk": tmp_path / "disk"}


@pytest.fixture
def make_cache(roots: dict[str, Path]) -> Iterator[MakeCache]:
    """A factory of caches on the tmp roots; every cache it started is stopped afterwards."""
    started: list[CacheHandle] = []

    def make(
        *,
        ram: int | None = 1 * MB,
        ram_file: int | None = 2 * MB,
        disk: int | None = 4 * MB,
        roots: Mapping[str, Path] | None = None,
        **settings: Any,
    ) -> CacheHandle:
        where = {**default_roots, **(roots or {})}
        tiers = []
        if ram is not None:
            tiers.append(TierSettings("ram", ram))
        if ram_file is not None:
            tiers.append(TierSettings("ram_file", ram_file, where["ram_file"]))
        if disk is not None:
            tiers.append(TierSettings("disk", disk, where["disk"]))
        settings.setdefault("writers", 2)
        handle = erllama_py.cache.start(CacheSettings(tiers=tuple(tiers), **settings))
        started.append(handle)
        return handle

    default_roots = roots
    yield make
    for handle in reversed(started):
        handle.stop(timeout=10.0)


@pytest.fixture
def cache(roots: dict[str, Path]) -> Iterator[CacheHandle]:
    """A cache started from a sys.yaml-style mapping: ram, ram_file and disk tiers."""
    handle = erllama_py.cache.start(
        {
            "tiers": [
                {"kind": "ram", "quota_mb": RAM_QUOTA_MB},
                {"kind": "ram_file", "root": str(roots["ram_file"]), "quota_mb": RAM_FILE_QUOTA_MB},
                {"kind": "disk", "root": str(roots["disk"]), "quota_mb": DISK_QUOTA_MB},
            ],
            "writers": 2,
        }
    )
    try:
        yield handle
    finally:
        handle.stop(timeout=10.0)


@pytest.fixture
def wait_until() -> WaitUntil:
    """Bounded polling for effects that arrive asynchronously (a `tell`, a demotion)."""

    def wait(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.002)

    return wait
