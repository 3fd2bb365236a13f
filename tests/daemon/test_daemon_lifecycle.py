"""``erllama-py daemon start|status|stop``, as processes, on a config of the test's own:
start returns once ready, a second start is refused, status in both forms and its exit
statuses, a stale pid file (a SIGKILLed daemon, or a pid another program holds) is
detected and replaced, a failed start says why, and a stop during a generation completes
the shutdown save that the next start serves from the disk tier."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import threading
from pathlib import Path

import pytest
from daemon_helpers import cli, daemon_config, poll

from erllama_py.cache import kvc
from erllama_py.daemon.http_client import post_json, stream_events
from erllama_py.kinds import SaveReason

SLOW = {"name": "slow", "backend": "stub", "n_ctx": 4096, "n_batch": 64, "n_seq_max": 2,
        "tier": "disk", "stub": {"n_vocab": 1000, "step_delay": 0.02}}  # fmt: skip


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return daemon_config(tmp_path, [SLOW])


def _start(config: Path) -> tuple[int, str]:
    started = cli("daemon", "start", "--config", config)
    assert started.returncode == 0, started.stdout + started.stderr
    match = re.search(r"erllama-py running \(pid (\d+)\) on (http://\S+)", started.stdout)
    assert match, started.stdout
    return int(match.group(1)), match.group(2)


def _stop(config: Path) -> str:
    stopped = cli("daemon", "stop", "--config", config)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    return stopped.stdout


def test_start_status_a_second_start_refused_then_stop(config: Path) -> None:
    root = config.parent
    pid, url = _start(config)
    try:
        human = cli("daemon", "status", "--config", config)
        assert human.returncode == 0
        assert f"pid {pid}" in human.stdout and url in human.stdout and "(ready)" in human.stdout
        assert re.search(r"slow: loaded, idle, running 0, queued 0, worker pid \d+", human.stdout)
        assert "disk:" in human.stdout and "worker restarts: 0" in human.stdout

        as_json = cli("daemon", "status", "--json", "--config", config)
        assert as_json.returncode == 0
        status = json.loads(as_json.stdout)
        assert status["running"] is True and status["pid"] == pid and status["url"] == url
        assert status["ready"] is True
        assert [m["name"] for m in status["models"]] == ["slow"]
        assert {t["kind"] for t in status["tiers"]} == {"ram", "disk"}

        again = cli("daemon", "start", "--config", config)
        assert again.returncode == 1
        assert again.stderr.strip().splitlines() == [
            f"erllama-py: erllama-py is already running (pid {pid}, pid file "
            f"{root / 'run' / 'erllama-py.pid'})"
        ]

        socket_path = root / "run" / "control.sock"
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    finally:
        out = _stop(config)
    assert f"erllama-py stopped (pid {pid})" in out
    assert not (root / "run" / "erllama-py.pid").exists()
    assert not (root / "run" / "control.sock").exists()
    down = cli("daemon", "status", "--config", config)
    assert down.returncode == 3 and "not running" in down.stdout
    down_json = cli("daemon", "status", "--json", "--config", config)
    assert down_json.returncode == 3 and json.loads(down_json.stdout) == {"running": False}
    assert "serving on" in cli("daemon", "logs", "--config", config).stdout


def test_a_stale_pid_file_is_detected_and_replaced(config: Path) -> None:
    root = config.parent
    pid_file = root / "run" / "erllama-py.pid"
    pid, _ = _start(config)
    os.kill(pid, signal.SIGKILL)  # no cleanup: the pid file and the socket stay behind
    poll(lambda: cli("daemon", "status", "--config", config).returncode == 3, "it is down")
    assert pid_file.read_text().strip() == str(pid)
    assert (root / "run" / "control.sock").exists()

    started = cli("daemon", "start", "--config", config)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"removed a stale pid file ({pid_file}, pid {pid})" in started.stdout
    assert int(pid_file.read_text()) != pid
    _stop(config)

    # A pid file naming a live process that is not a daemon (this test) is stale too.
    pid_file.write_text(f"{os.getpid()}\n")
    assert cli("daemon", "status", "--config", config).returncode == 3
    assert "is not running" in cli("daemon", "stop", "--config", config).stdout
    assert not pid_file.exists()


def test_a_failed_start_says_why_in_one_line(tmp_path: Path) -> None:
    bad = daemon_config(tmp_path, [{"name": "gone", "model_path": str(tmp_path / "no.gguf")}])
    failed = cli("daemon", "start", "--config", bad)
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "ModelLoadError" in lines[0], failed.stderr
    assert not (tmp_path / "run" / "erllama-py.pid").exists()


def test_stop_during_a_generation_saves_it_and_the_next_start_hits_it(config: Path) -> None:
    _, url = _start(config)
    body = {"model": "slow", "prompt": "the long story of the cat and the moon",
            "max_tokens": 3000, "stream": True}  # fmt: skip
    seen: list[object] = []
    twenty = threading.Event()
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            for event in stream_events(f"{url}/v1/completions", body):
                seen.append(event)
                if len(seen) == 20:
                    twenty.set()
        except BaseException as exc:  # the stream may end abruptly; record, do not hide
            failure.append(exc)
        finally:
            twenty.set()

    thread = threading.Thread(target=generate)
    thread.start()
    assert twenty.wait(120)
    assert len(seen) >= 20, failure
    _stop(config)
    thread.join(60)
    assert not thread.is_alive()
    rows = [kvc.read_file(p)[0] for p in sorted((config.parent / "disk").glob("*.kvc"))]
    shutdown = [r for r in rows if r.reason is SaveReason.SHUTDOWN]
    assert len(shutdown) == 1, [r.reason for r in rows]
    saved = shutdown[0].tokens
    assert len(saved) > 20

    _, url = _start(config)
    try:
        reply = post_json(f"{url}/v1/completions",
                          {"model": "slow", "prompt": saved, "max_tokens": 2})  # fmt: skip
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == len(saved), reply
    finally:
        _stop(config)
