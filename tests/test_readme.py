"""The README's quick taste runs as written (on the shipped sys.yaml, tiers moved to tmp)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _quick_taste() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    return str(blocks[0])


@pytest.mark.real_model
def test_the_readme_quick_taste_runs(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "sys.yaml").read_text(encoding="utf-8"))
    for tier in config["cache"]["tiers"]:
        if "root" in tier:
            tier["root"] = str(tmp_path / tier["kind"])
    config["daemon"] = {"log_file": str(tmp_path / "log" / "erllama-py.log")}
    (tmp_path / "sys.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    script = tmp_path / "taste.py"
    script.write_text(_quick_taste(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("cold ") and lines[1].startswith("exact ")
    assert lines[3].startswith("parent ")
    assert "'type': 'done'" in done.stdout
