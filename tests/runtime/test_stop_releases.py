"""`rt.stop()` releases everything the runtime took: twenty runtimes, started and stopped
in one process, leave its descriptors, threads and child processes as they were.

Each runtime loads the tiny llama model with all three tier kinds, serves two requests
(their cold and finish saves fill the RAM tier and the arena) and is stopped; nothing
waits for garbage collection: the stopped runtimes stay referenced until the end.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import psutil

import erllama_py
from erllama_py import Runtime

RUNTIMES = 20


def runtime_config_for(root: Path) -> dict[str, Any]:
    return {
        "cache": {
            "tiers": [
                {"kind": "ram", "quota_mb": 16},
                {"kind": "ram_file", "root": str(root / "ram_file"), "quota_mb": 16},
                {"kind": "disk", "root": str(root / "disk"), "quota_mb": 16},
            ],
        },
        "policy": {"min_tokens": 4, "cold_min_tokens": 4, "boundary_trim_tokens": 0},
        "daemon": {
            "log_file": str(root / "log" / "erllama-py.log"),
            "pid_file": str(root / "erllama-py.pid"),
            "control_socket": str(root / "control.sock"),
        },
    }


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _one_runtime(root: Path, tiny_model_path: Path) -> Runtime:
    rt = erllama_py.start(runtime_config_for(root))
    try:
        rt.load_model("m", model_path=tiny_model_path, n_ctx=256, n_batch=64, n_threads=1)
        first = rt.complete("m", "the sun and the moon", max_tokens=3)
        rt.complete("m", "the sun and the moon", max_tokens=3)  # an exact hit on the first
        assert first.tokens
        rt.cache.wait_idle()
        assert any(r.tier == "ram" for r in rt.cache_rows())
    finally:
        rt.stop()
    return rt


def test_twenty_runtimes_started_and_stopped_return_to_the_baseline(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    _one_runtime(tmp_path / "warm-up", tiny_model_path)  # imports and lazy globals
    fds, threads, children = _fds(), set(threading.enumerate()), _children()
    # Kept referenced: what is released must be released by stop(), not by the collector.
    stopped = [_one_runtime(tmp_path / f"rt{i}", tiny_model_path) for i in range(RUNTIMES)]
    assert all(rt.stopped for rt in stopped)
    assert _children() == children
    assert set(threading.enumerate()) == threads
    leaked = {fd: _target(fd) for fd in _fds() - fds}
    assert not leaked, leaked


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"
