"""``erllama-py serve`` as a process: it prints its URL, stops gracefully on SIGTERM during
a generation (exit status 0, the generation's state saved to disk for the next start),
and fails with one clear line for a port in use, a bad configuration or a bad model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from erllama_py.cache import kvc
from erllama_py.kinds import SaveReason

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


def _config(root: Path, **server: Any) -> Path:
    config = {
        "cache": {"tiers": [{"kind": "disk", "root": str(root / "disk"), "quota_mb": 64}]},
        "policy": {"min_tokens": 4, "cold_min_tokens": 4},
        "daemon": {"log_file": str(root / "log" / "erllama-py.log")},
        "server": {"port": 0, "shutdown_timeout_s": 1, **server},
        "models": [
            {
                "name": "slow",
                "backend": "stub",
                "n_ctx": 4096,
                "n_batch": 64,
                "n_seq_max": 2,
                "tier": "disk",
                "stub": {"n_vocab": 1000, "step_delay": 0.02},
            },
        ],
    }
    path = root / "sys.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _serve(config: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "erllama_py.cli", "serve", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("erllama-py serving on "):
            url = line.split()[3]
            curl = process.stdout.readline()
            assert curl.startswith("try: curl ") and "/v1/chat/completions" in curl
            return url
    process.kill()
    _, err = process.communicate()
    pytest.fail(f"the server did not start: {err[-2000:]}")


def _rows(disk: Path) -> list[kvc.RowHeader]:
    headers = []
    for path in sorted(disk.glob("*.kvc")):
        headers.append(kvc.read_file(path)[0])
    return headers


def test_sigterm_during_a_generation_exits_0_and_the_next_start_resumes_from_disk(tmp_path):
    config = _config(tmp_path)
    server = _serve(config)
    url = _url(server)
    prompt = "the long story of the cat and the moon"
    body = {"model": "slow", "prompt": prompt, "max_tokens": 3000, "stream": True}
    seen = 0
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                seen += 1
                if seen == 20:
                    server.send_signal(signal.SIGTERM)
        # The stream ends on its own: the runtime saved the request and ended it.
    assert server.wait(60) == 0, server.stderr.read() if server.stderr else ""
    rows = _rows(tmp_path / "disk")
    shutdown = [r for r in rows if r.reason is SaveReason.SHUTDOWN]
    assert len(shutdown) == 1, [r.reason for r in rows]
    saved = shutdown[0].tokens
    assert len(saved) > 20
    assert not list((tmp_path / "disk").glob("*.tmp"))

    again = _serve(config)
    url = _url(again)
    try:
        reply = httpx.post(
            f"{url}/v1/completions",
            json={"model": "slow", "prompt": saved, "max_tokens": 2},
            timeout=60,
        ).json()
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == len(saved), reply
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0


def _fails(config: Path, *args: str) -> str:
    process = _serve(config, *args)
    _, err = process.communicate(timeout=START_TIMEOUT_S)
    assert process.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("erllama-py: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_port_in_use_is_one_line_and_a_non_zero_exit(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        line = _fails(_config(tmp_path), "--port", str(port))
        assert "server.port" in line and str(port) in line
    finally:
        taken.close()


def test_a_bad_config_or_model_is_one_line_and_a_non_zero_exit(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"server": {"port": "eighty"}}), encoding="utf-8")
    assert "server.port" in _fails(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        yaml.safe_dump(
            {
                "daemon": {"log_file": str(tmp_path / "log" / "x.log")},
                "cache": {"tiers": [{"kind": "ram", "quota_mb": 16}]},
                "server": {"port": 0},
                "models": [{"name": "gone", "model_path": str(tmp_path / "nope.gguf")}],
            }
        ),
        encoding="utf-8",
    )
    assert "ModelLoadError" in _fails(missing)
