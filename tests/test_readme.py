"""The README's examples run as written: the quick taste (on the shipped sys.yaml, tiers
moved to tmp) and the server examples, OpenAI's and Anthropic's (against `erllama-py
serve` on that sys.yaml)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _example(marker: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"the README has no single python example with {marker!r}"
    return str(blocks[0])


def _quick_taste() -> str:
    return _example("import erllama_py")


def _config(tmp_path: Path) -> dict:
    config = yaml.safe_load((REPO / "sys.yaml").read_text(encoding="utf-8"))
    for tier in config["cache"]["tiers"]:
        if "root" in tier:
            tier["root"] = str(tmp_path / tier["kind"])
    config["daemon"] = {"log_file": str(tmp_path / "log" / "erllama-py.log")}
    return config


@pytest.mark.real_model
@pytest.mark.parametrize("marker", ["from openai import OpenAI", "import anthropic"])
def test_the_readme_server_examples_run_against_make_run(tmp_path: Path, marker: str) -> None:
    from erllama_py.config import load_config
    from erllama_py.server.serve import start_serving

    config = _config(tmp_path)
    config["server"]["port"] = 0
    serving = start_serving(load_config(config))
    try:
        script = tmp_path / "client.py"
        code = _example(marker)
        assert "http://127.0.0.1:8080" in code, "the example names make run's address"
        script.write_text(code.replace("http://127.0.0.1:8080", serving.url), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=300,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip()
    finally:
        serving.stop()


@pytest.mark.real_model
def test_the_readme_quick_taste_runs(tmp_path: Path) -> None:
    config = _config(tmp_path)
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
