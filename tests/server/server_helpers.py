"""The HTTP server suite's configuration: three models and small timeouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REQUEST_TIMEOUT_S = 8.0  # the server's request timeout (the 504 test waits this long)
SLOW_STEP_S = 0.02
POLICY = {"min_tokens": 4, "cold_min_tokens": 4, "boundary_trim_tokens": 0,
          "boundary_align_tokens": 1}  # fmt: skip


def server_config(root: Path, tiny: Path, **server: Any) -> dict[str, Any]:
    """A configuration rooted in `root` with the suite's three models."""
    return {
        "cache": {
            "tiers": [
                {"kind": "ram", "quota_mb": 64},
                {"kind": "disk", "root": str(root / "disk"), "quota_mb": 128},
            ]
        },
        "policy": POLICY,
        "daemon": {"log_file": str(root / "log" / "erllama-py.log")},
        "server": {"port": 0, "request_timeout_s": REQUEST_TIMEOUT_S, **server},
        "models": [
            {
                "name": "tiny",
                "model_path": str(tiny),
                "n_ctx": 512,
                "n_batch": 64,
                "n_seq_max": 4,
                "n_threads": 1,
            },
            {
                "name": "stub",
                "backend": "stub",
                "n_ctx": 512,
                "n_batch": 64,
                "n_seq_max": 4,
                "stub": {"n_vocab": 1000},
            },
            {
                "name": "slow",
                "backend": "stub",
                "n_ctx": 4096,
                "n_batch": 64,
                "n_seq_max": 1,
                "max_queue": 2,
                "stub": {"n_vocab": 1000, "step_delay": SLOW_STEP_S},
            },
        ],
    }
