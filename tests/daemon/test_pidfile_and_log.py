"""The pid file (atomic claim, stale detection, release) and the rotated log (records,
prints and raw descriptor writes all land in the current file)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from daemon_helpers import env

from erllama_py.daemon.logfile import log_tail
from erllama_py.daemon.pidfile import AlreadyRunningError, claim, daemon_pid, release


def _fake_daemon() -> subprocess.Popen[bytes]:
    """A process whose command line looks like a daemon's."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "erllama_py.cli", "--daemon"]
    )


def test_claim_refuses_a_live_daemon_and_replaces_a_dead_one(tmp_path: Path) -> None:
    path = tmp_path / "run" / "d.pid"
    fake = _fake_daemon()
    try:
        assert claim(path, fake.pid) is None
        assert path.read_text() == f"{fake.pid}\n"
        assert daemon_pid(path) == fake.pid
        with pytest.raises(AlreadyRunningError, match=f"already running \\(pid {fake.pid}"):
            claim(path, 4242)
        fake.kill()
        fake.wait()
        assert daemon_pid(path) is None
        assert claim(path, 4242) == fake.pid  # replaced, naming the stale pid
    finally:
        fake.kill()
        fake.wait()
    release(path, 1)  # not ours: kept
    assert path.exists()
    release(path, 4242)
    assert not path.exists()
    assert [p.name for p in path.parent.iterdir()] == []  # no temp file left


def test_a_pid_file_of_another_program_or_garbage_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "d.pid"
    path.write_text(f"{os.getpid()}\n")  # this test: alive, not a daemon
    assert daemon_pid(path) is None
    path.write_text("not a pid\n")
    assert daemon_pid(path) is None
    assert claim(path, 7) is None


ROTATE = """
import logging, os, sys
from pathlib import Path
from erllama_py.daemon.logfile import setup_daemon_log
setup_daemon_log(Path(sys.argv[1]), max_bytes=400, backups=2)
log = logging.getLogger("t")
for i in range(20):
    print(f"print {i}")
    log.info("record %d %s", i, "x" * 40)
os.write(2, b"raw fd 2 after the rotations\\n")
"""


def test_the_log_rotates_and_takes_prints_and_raw_writes(tmp_path: Path) -> None:
    log = tmp_path / "log" / "d.log"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(ROTATE), str(log)],
                          env=env(), capture_output=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"" and done.stderr == b""  # everything went to the log
    names = sorted(p.name for p in log.parent.iterdir())
    assert names == ["d.log", "d.log.1", "d.log.2"]
    current = log.read_text()
    assert "raw fd 2 after the rotations" in current
    assert "record 19" in current and "print 19" in current
    assert log_tail(log, lines=1) == ["raw fd 2 after the rotations"]
    assert all(p.stat().st_size < 1000 for p in log.parent.iterdir())
