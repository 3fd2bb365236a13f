"""Helpers of the daemon suite: a config rooted in a temp folder, the CLI as a process,
a pseudo-terminal session, and bounded polling."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import yaml

REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 180.0  # a daemon start loads its models on a shared machine
POLICY = {"min_tokens": 4, "cold_min_tokens": 4, "boundary_trim_tokens": 0,
          "boundary_align_tokens": 1}  # fmt: skip


def daemon_config(root: Path, models: list[dict[str, Any]], **server: Any) -> Path:
    """Write a sys.yaml whose every file (pid, socket, log, disk tier) is under `root`."""
    config = {
        "cache": {
            "tiers": [
                {"kind": "ram", "quota_mb": 64},
                {"kind": "disk", "root": str(root / "disk"), "quota_mb": 64},
            ]
        },
        "policy": POLICY,
        "daemon": {
            "pid_file": str(root / "run" / "erllama-py.pid"),
            "control_socket": str(root / "run" / "control.sock"),
            "log_file": str(root / "log" / "erllama-py.log"),
        },
        "server": {"port": 0, "shutdown_timeout_s": 2, **server},
        "models": models,
    }
    path = root / "sys.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def tiny_model(path: Path) -> dict[str, Any]:
    return {"name": "tiny", "model_path": str(path), "n_ctx": 512, "n_batch": 64,
            "n_seq_max": 2, "n_threads": 1}  # fmt: skip


def env() -> dict[str, str]:
    # A plain terminal: no colours, and lines wide enough that rich does not wrap them.
    return {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "TERM": "dumb",
            "COLUMNS": "200"}  # fmt: skip


def cli(*args: str | Path, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``erllama-py ARGS`` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "erllama_py.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env(), check=False,
    )  # fmt: skip


def spawn(*args: str | Path, timeout: float = 60.0) -> pexpect.spawn:
    """``erllama-py ARGS`` on a pseudo-terminal, driven as a person would."""
    return pexpect.spawn(
        sys.executable, ["-m", "erllama_py.cli", *map(str, args)],
        encoding="utf-8", timeout=timeout, env=env(), dimensions=(50, 200),
    )  # fmt: skip


def poll(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> Any:
    """Poll `predicate` until it is truthy (bounded: reaching the bound fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(0.05)
