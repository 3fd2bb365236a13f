"""The short version of the crash soak (scripts/crash_soak.py): five SIGKILLs of a
runtime saving to every tier, each restart checked (no temp files left, every exact
hit equal to the cold run), then a clean run that checks the index and every row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "crash_soak.py"


def test_five_sigkills_of_a_saving_runtime_serve_nothing_corrupt(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--iterations",
            "5",
            "--model",
            "tiny",
            "--max-kill-ms",
            "800",
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,  # generous: a wedged child must fail the test, not hang the suite
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = dict(
        line.strip().split(": ", 1) for line in done.stdout.splitlines() if line.startswith("  ")
    )
    assert lines["kills"] == "5"
    assert lines["exact_mismatches"] == lines["cold_mismatches"] == "0"
    assert lines["temp_files_left"] == "0"
    assert lines["final_problems"] == "[]"
    assert int(lines["exact_hits"]) > 0  # restarts did restore from the surviving tiers
    assert done.stdout.rstrip().endswith("PASS")
