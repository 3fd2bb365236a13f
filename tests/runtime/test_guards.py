"""Guarded tier roots and the clear errors of issue 9.

- One runtime per tier root: a second one (in this process or another) is refused at
  start with a `ConfigError` naming the root and the holder's pid; the lock goes with
  `stop()`, with a failed start, and with the death of its holder.
- ``n_ctx`` past the model's training context is refused at load, naming the limit.
- A non-mapping config is a `ConfigError`; a config without ``policy`` saves short
  prompts as the shipped sys.yaml does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import erllama_py
from erllama_py import ConfigError, HitKind, ModelLoadError
from erllama_py.cache.rootlock import LOCK_NAME

REPO = Path(__file__).resolve().parents[2]


def test_a_second_runtime_on_a_root_in_use_is_refused_naming_the_root_and_holder(
    make_runtime: Any, tmp_path: Path
) -> None:
    first = make_runtime()
    with pytest.raises(ConfigError) as caught:
        make_runtime()
    error = caught.value
    assert error.key == "cache.tiers[1].root"  # the ram_file tier, the first file tier
    assert str(tmp_path / "ram_file") in error.reason
    assert f"pid {os.getpid()}" in error.reason
    first.stop()
    make_runtime().stop()  # stop released every root


def test_a_start_refused_on_one_root_keeps_no_lock_on_the_others(
    make_runtime: Any, tmp_path: Path
) -> None:
    holder = make_runtime(tmp_path / "holder")
    tiers = [
        {"kind": "ram", "quota_mb": 8},
        {"kind": "ram_file", "root": str(tmp_path / "free"), "quota_mb": 8},
        {"kind": "disk", "root": str(tmp_path / "holder" / "disk"), "quota_mb": 8},
    ]
    with pytest.raises(ConfigError) as caught:
        make_runtime(cache={"tiers": tiers})
    assert caught.value.key == "cache.tiers[2].root"
    holder.stop()
    make_runtime(cache={"tiers": tiers[:2]}).stop()  # the free root was released


def test_a_root_locked_by_another_process_is_refused_until_that_process_dies(
    make_runtime: Any, tmp_path: Path
) -> None:
    root = tmp_path / "ram_file"
    root.mkdir()
    code = (
        "import sys; from pathlib import Path; "
        "from erllama_py.cache.rootlock import RootLocks; "
        "from erllama_py.config import load_config; "
        "locks = RootLocks(); "
        "locks.acquire(load_config({'cache': {'tiers': "
        f"[{{'kind': 'ram_file', 'root': {str(root)!r}}}]}}}}).cache); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as caught:
            make_runtime()
        assert f"pid {holder.pid}" in caught.value.reason
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    make_runtime()  # the kernel released the dead holder's lock
    assert (root / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_n_ctx_past_the_training_context_is_refused_at_load(
    make_runtime: Any, tiny_model_path: Path
) -> None:
    rt = make_runtime()
    with pytest.raises(ModelLoadError) as caught:
        rt.load_model("long", model_path=tiny_model_path, n_ctx=8192, n_threads=1)
    assert "n_ctx: 8192 is past the model's training context of 4096 tokens" in str(caught.value)
    assert "long" not in [m.name for m in rt.models()]
    info = rt.load_model("fits", model_path=tiny_model_path, n_ctx=4096, n_threads=1).info()
    assert info.n_ctx == info.n_ctx_train == 4096


def test_a_config_that_is_not_a_mapping_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        erllama_py.start([1, 2])  # type: ignore[arg-type]
    assert caught.value.key == "<root>" and "list" in caught.value.reason


def test_without_a_policy_section_a_short_prompt_is_cached_as_with_sys_yaml(
    make_runtime: Any, load: Any, tmp_path: Path
) -> None:
    # The shipped policy saves prompts of 64 tokens and more (the original's saved none
    # under 512); a config that leaves the section out gets that same policy.
    config = erllama_py.config.load_config({"cache": {"tiers": [{"kind": "ram", "quota_mb": 64}]}})
    rt = erllama_py.start(config)
    try:
        load(rt, "stub", "m")
        prompt = [5 + i % 300 for i in range(80)]
        rt.model("m").complete(prompt, max_tokens=1)
        rt.cache.wait_idle(30)
        assert rt.model("m").complete(prompt, max_tokens=1).cache.kind is HitKind.EXACT
    finally:
        rt.stop()
