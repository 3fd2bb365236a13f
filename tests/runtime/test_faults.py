"""Faults: context workers killed (SIGKILL, SIGSEGV, SIGABRT) while prefilling, decoding
and saving; restart intensity running out; corrupt and aborting GGUF files; scripts
without a ``__main__`` guard.

After a crash: requests in flight fail with `WorkerCrashedError` at once, the supervisor
starts a new worker, queued requests are served, nothing corrupt is cached, and the
runtime, the cache and the other models carry on untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import erllama_py
from erllama_py import CacheHit, ModelFailedError, ModelLoadError, WorkerCrashedError
from erllama_py.model.client import DEFAULT_LOAD_TIMEOUT_S
from erllama_py.model.testmodel import write_corrupt_models, write_duplicate_token_model

REPO = Path(__file__).resolve().parents[2]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGSEGV": signal.SIGSEGV, "SIGABRT": signal.SIGABRT}


def in_thread(fn, *args: Any, **kwargs: Any) -> Future[Any]:
    """Run `fn` in a thread; its outcome goes to the returned future."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(value)

    threading.Thread(target=run, daemon=True).start()
    return future


def long_prompt(n: int) -> list[int]:
    return [1] + [5 + (i * 7) % 300 for i in range(n - 1)]


def find(node: dict[str, Any], name: str) -> dict[str, Any] | None:
    if node["name"] == name:
        return node
    for child in node.get("children") or []:
        found = find(child, name)
        if found is not None:
            return found
    return None


class Bystander:
    """Another model, and what it answered before the fault."""

    def __init__(self, rt, load) -> None:
        self.model = load(rt, "stub", "bystander")
        self.pid = self.model.worker_pid()
        self.answer = self.model.complete("the bystander", max_tokens=5).tokens

    def check_untouched(self) -> None:
        info = self.model.info_now()
        assert info.worker.pid == self.pid
        assert info.worker.restarts == 0
        assert info.phase == "idle"
        assert self.model.complete("the bystander", max_tokens=5).tokens == self.answer


def wait_restarted(m, old_pid: int, wait_until) -> int:
    def restarted() -> bool:
        worker = m.info_now().worker
        return worker.pid not in (None, old_pid) and worker.state == "running"

    wait_until(restarted, f"the worker of {m.name} runs again", 30.0)
    return m.worker_pid()


def check_recovered(rt, m, old_pid: int, wait_until, assert_cache_sound) -> None:
    new_pid = wait_restarted(m, old_pid, wait_until)
    assert new_pid != old_pid
    info = m.info_now()
    assert info.worker.restarts == 1
    assert info.worker_starts == 2
    assert info.status == "loaded"
    assert len(m.complete("after the crash", max_tokens=4).tokens) == 4
    assert_cache_sound(rt)
    tree = rt.tree()
    assert tree["state"] == "running"
    cache_sup = find(tree, "cache_sup")
    assert cache_sup is not None and cache_sup["restarts"] == 0
    assert all(c["restarts"] == 0 for c in cache_sup["children"])


def assert_crashed(future: Future[Any], sig: int) -> WorkerCrashedError:
    # The death notice (the channel closing), not a timeout, ends the request: it fails
    # with the signal that killed the worker. How soon is measured in bench/, not here.
    with pytest.raises(WorkerCrashedError) as info:
        future.result(timeout=30)
    error = info.value
    assert error.exitcode == -sig
    assert error.signal_name == signal.Signals(sig).name
    assert error.model == "m"
    assert signal.Signals(sig).name in str(error)
    return error


# --------------------------------------------------------------------------- crashes


def test_sigkill_during_prefill_fails_the_request_and_a_new_worker_serves_the_queue(
    rt, load, model_kind, wait_until, assert_cache_sound
):
    if model_kind == "stub":
        m = load(rt, "stub", n_ctx=2048, n_batch=8, n_seq_max=1, stub={"step_delay": 0.01})
    else:
        m = load(rt, "tiny", n_ctx=2048, n_batch=8, n_seq_max=1)
    bystander = Bystander(rt, load)
    pid = m.worker_pid()
    prefilling = in_thread(m.complete, long_prompt(2000), max_tokens=4)
    wait_until(lambda: rt.model_info("m").active == 1, "the long prompt is admitted")
    queued = in_thread(m.complete, "the queued one", max_tokens=4)
    wait_until(lambda: rt.pending_len("m") == 1, "the second request waits")
    wait_until(lambda: rt.phase("m") == "prefilling", "the long prompt prefills")
    os.kill(pid, signal.SIGKILL)
    assert_crashed(prefilling, signal.SIGKILL)
    assert queued.result(timeout=30).finish_reason == "length"
    check_recovered(rt, m, pid, wait_until, assert_cache_sound)
    bystander.check_untouched()
    # Nothing of the killed prefill was saved: the long prompt is cold again.
    assert m.complete(long_prompt(40), max_tokens=1).cache.kind == "cold"


@pytest.mark.parametrize("sig_name", list(SIGNALS))
def test_a_worker_killed_during_decode_fails_its_requests_and_is_restarted(  # noqa: PLR0917
    rt, load, model_kind, sig_name, wait_until, assert_cache_sound
):
    sig = SIGNALS[sig_name]
    stub = {"step_delay": 0.005} if model_kind == "stub" else {}
    m = load(rt, model_kind, n_ctx=2048, n_seq_max=2, **({"stub": stub} if stub else {}))
    bystander = Bystander(rt, load)
    pid = m.worker_pid()
    running = [in_thread(m.complete, f"decode number {i}", max_tokens=2000) for i in range(2)]
    wait_until(lambda: rt.model_info("m").active == 2, "both requests are admitted")
    queued = in_thread(m.complete, "the queued one", max_tokens=3)
    wait_until(lambda: rt.pending_len("m") == 1, "a third request waits")
    wait_until(lambda: rt.model_info("m").tokens_generated >= 6, "both requests decode")
    assert rt.phase("m") == "generating"
    os.kill(pid, sig)
    for future in running:
        assert_crashed(future, sig)
    assert queued.result(timeout=30).finish_reason == "length"
    check_recovered(rt, m, pid, wait_until, assert_cache_sound)
    bystander.check_untouched()


def _memfds(pid: int) -> int:
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:erllama-state"):
                    count += 1
            except OSError:
                continue
    except OSError:
        return 0
    return count


def test_sigkill_while_the_worker_packs_a_save_leaves_nothing_corrupt(
    rt, load, wait_until, assert_cache_sound
):
    # Large logits (16 MB) and a save after every token: the worker spends most of its
    # time packing, and is killed while it holds a state buffer it has not handed over.
    m = load(
        rt,
        "stub",
        tier="disk",
        n_seq_max=1,
        stub={"n_vocab": 4_000_000},
        policy={"continued_interval": 1},
    )
    pid = m.worker_pid()
    running = in_thread(m.complete, "pack pack pack", max_tokens=200)
    wait_until(lambda: rt.model_info("m").tokens_generated >= 3, "a few saves are made", 60)
    deadline = time.monotonic() + 30
    while _memfds(pid) == 0:
        assert time.monotonic() < deadline, "the worker never packed a state"
        assert not running.done(), "the request ended before a save was caught"
    os.kill(pid, signal.SIGKILL)
    assert_crashed(running, signal.SIGKILL)
    rt.cache.wait_idle(60)
    saved = [r for r in rt.cache_rows() if r.reason in ("cold", "continued")]
    assert saved, "no save landed before the kill"
    assert all(r.status == "available" for r in rt.cache_rows())
    assert assert_cache_sound(rt) == len(saved)
    new_pid = wait_restarted(m, pid, wait_until)
    assert new_pid != pid
    # The longest state saved before the kill restores in the new worker.
    longest = max(r.n_tokens for r in saved)
    prompt = m.tokens("pack pack pack")
    generated = m.complete(prompt, max_tokens=longest - len(prompt) + 1).tokens
    context = [*prompt, *generated[: longest - len(prompt)]]
    hit = m.complete(context, max_tokens=1)
    assert hit.cache == CacheHit("exact", longest)


def test_a_request_whose_restore_is_cut_short_by_a_crash_is_served_by_the_new_worker(
    rt, load, wait_until
):
    # 16 MB of logits: the worker maps the state and checks it for a while, and only an
    # unpack gives it a state buffer before this exact hit generates.
    m = load(rt, "stub", n_seq_max=1, stub={"n_vocab": 4_000_000})
    prompt = m.tokens("restore me now please")
    first = m.complete(prompt, max_tokens=3)
    rt.cache.wait_idle()
    pid = m.worker_pid()
    restoring = in_thread(m.complete, prompt, max_tokens=3)
    deadline = time.monotonic() + 30
    while _memfds(pid) == 0:
        assert time.monotonic() < deadline, "the worker never received the state"
    os.kill(pid, signal.SIGKILL)
    result = restoring.result(timeout=30)  # not failed: it was never admitted for good
    assert result.cache == CacheHit("exact", len(prompt))
    assert result.tokens == first.tokens
    assert wait_restarted(m, pid, wait_until) != pid
    assert all(row.refcount == 0 for row in rt.cache_rows())


def test_a_worker_killed_right_after_a_finish_save_leaves_a_valid_row(
    rt, load, model_kind, wait_until, assert_cache_sound
):
    m = load(rt, model_kind, tier="disk")
    prompt = m.tokens("the cat and the dog and the tree")
    pid = m.worker_pid()
    first = m.complete(prompt, max_tokens=8)
    os.kill(pid, signal.SIGKILL)  # the finish save is still being written by the pool
    assert assert_cache_sound(rt) >= 2
    keys = {r.key_hex: r for r in rt.cache_rows()}
    assert keys[first.finish_key].reason == "finish"
    wait_restarted(m, pid, wait_until)
    hit = m.complete(prompt, max_tokens=8)
    assert hit.cache.kind == "exact"
    assert hit.tokens == first.tokens
    resumed = m.complete([*prompt, *first.tokens], max_tokens=3, parent_key=first.finish_key)
    assert resumed.cache.kind == "parent"


def test_killing_an_idle_worker_is_noticed_and_the_next_request_is_served(
    rt, load, model_kind, wait_until
):
    m = load(rt, model_kind)
    answer = m.complete("the idle one", max_tokens=5).tokens
    pid = m.worker_pid()
    os.kill(pid, signal.SIGKILL)
    # Submitted right away: it waits for the new worker instead of failing.
    assert m.complete("the idle one", max_tokens=5).tokens == answer
    assert wait_restarted(m, pid, wait_until) != pid


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cache_file_is_dropped_and_never_restored(
    rt, load, model_kind, damage, assert_cache_sound
):
    m = load(rt, model_kind, tier="disk")
    prompt = m.tokens("the sun and the moon and the sky")
    first = m.complete(prompt, max_tokens=6)
    rt.cache.wait_idle()
    rows = rt.cache_rows()
    assert {r.reason for r in rows} == {"cold", "finish"}
    for row in rows:
        path = Path(row.path)
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[len(data) - 100 :]
        path.write_bytes(bytes(data))
    before = rt.counters()
    # Each damaged row is refused when first tried (checksum or size) and dropped.
    follow = [*prompt, *first.tokens]
    resumed = m.complete(follow, max_tokens=4, parent_key=first.finish_key)
    assert resumed.cache.kind == "cold"
    again = m.complete(prompt, max_tokens=6)
    assert again.cache.kind != "exact"
    assert rt.counters().corrupt_files - before.corrupt_files == 2
    if model_kind == "stub":  # the stub's tokens depend on the context only
        assert again.tokens == first.tokens
        reference = load(rt, "stub", "ref", reference=True)
        assert resumed.tokens == reference.complete(follow, max_tokens=4).tokens
    assert_cache_sound(rt)  # the damaged files are gone; the new saves are sound
    hit = m.complete(follow, max_tokens=4)
    assert hit.cache == CacheHit("exact", len(follow))
    assert hit.tokens == resumed.tokens


# --------------------------------------------------------------------------- restart intensity


def test_a_model_whose_restart_intensity_runs_out_is_failed_until_reloaded(rt, load, wait_until):
    m = load(rt, "stub", n_seq_max=1, restart={"intensity": 1, "period_s": 60})
    bystander = Bystander(rt, load)
    answer = m.complete("the answer", max_tokens=4).tokens
    first = m.worker_pid()
    os.kill(first, signal.SIGKILL)
    second = wait_restarted(m, first, wait_until)
    assert m.info_now().phase != "failed"
    # The second crash within the period is one too many.
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: rt.phase("m") == "failed", "the model is reported failed")
    info = rt.model_info("m")
    assert info.status == "failed" and info.phase == "failed"
    assert info.worker.pid is None
    assert {x.name: x.status for x in rt.models()}["m"] == "failed"
    for call in (
        lambda: rt.complete("m", "the answer", max_tokens=4),
        lambda: rt.stream("m", "the answer"),
        lambda: rt.tokenize("m", "the answer"),
        lambda: rt.prefill("m", "the answer"),
    ):
        with pytest.raises(ModelFailedError, match="unload and load"):
            call()
    bystander.check_untouched()
    rt.unload("m")
    reloaded = load(rt, "stub", n_seq_max=1, restart={"intensity": 1, "period_s": 60})
    assert reloaded.info_now().phase == "idle"
    assert reloaded.info_now().worker.restarts == 0
    assert reloaded.complete("the answer", max_tokens=4).tokens == answer


def test_requests_in_flight_and_queued_when_a_model_fails_get_an_error_not_a_hang(
    rt, load, wait_until
):
    m = load(
        rt,
        "stub",
        n_seq_max=1,
        restart={"intensity": 0, "period_s": 60},
        stub={"step_delay": 0.01},
    )
    pid = m.worker_pid()
    running = in_thread(m.complete, "the running one", max_tokens=1000)
    wait_until(lambda: rt.model_info("m").active == 1, "the first request runs")
    queued = in_thread(m.complete, "the queued one", max_tokens=4)
    wait_until(lambda: rt.pending_len("m") == 1, "the second request waits")
    os.kill(pid, signal.SIGKILL)
    assert_crashed(running, signal.SIGKILL)
    with pytest.raises(ModelFailedError, match="unload and load"):
        queued.result(timeout=30)
    wait_until(lambda: rt.phase("m") == "failed", "the model is reported failed")


# --------------------------------------------------------------------------- bad model files


def _bad_models(directory: Path) -> dict[str, Path]:
    paths = write_corrupt_models(directory)
    paths["duplicate_token"] = write_duplicate_token_model(directory / "duplicate-token.gguf")
    return paths


BAD_KINDS = (
    "missing",
    "empty",
    "not_gguf",
    "wrong_magic",
    "header_only",
    "truncated",
    "truncated_metadata",
    "duplicate_token",
)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_loading_a_corrupt_or_aborting_gguf_fails_cleanly_and_leaves_nothing_running(
    rt, load, tmp_path, kind, children
):
    path = _bad_models(tmp_path / "bad")[kind]
    before = children.running()
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        rt.load_model("m", model_path=path, n_ctx=256, n_batch=64, n_threads=1)
    # Not a speed bound: a crash while loading must be noticed, not waited out (the load
    # timeout is DEFAULT_LOAD_TIMEOUT_S, 120 s); half of it is a generous margin.
    assert time.monotonic() - started < DEFAULT_LOAD_TIMEOUT_S / 2
    message = str(info.value)
    assert info.value.model == "m"
    if kind == "duplicate_token":
        assert "died while loading" in message and "SIGABRT" in message
        assert "GGML_ASSERT" in message
    else:
        assert str(path.name) in message or "not found" in message
    assert children.wait_gone(children.running() - before) == set()
    assert rt.models() == []
    assert rt.tree()["state"] == "running"
    # The name is free and the runtime loads a good model under it.
    good = load(rt, "tiny")
    assert len(good.complete("the cat", max_tokens=2).tokens) == 2


def test_a_model_listed_in_the_config_that_cannot_load_fails_start_and_leaves_nothing(
    make_runtime, tmp_path, children
):
    path = write_duplicate_token_model(tmp_path / "duplicate-token.gguf")
    before = children.running()
    with pytest.raises(ModelLoadError):
        make_runtime(models=[{"name": "bad", "model_path": str(path), "n_ctx": 256}])
    assert children.wait_gone(children.running() - before) == set()


# --------------------------------------------------------------------------- scripts


SCRIPT = textwrap.dedent(
    """\
    import json, os, sys
    import erllama_py

    with open(os.environ["MARKER"], "a") as f:
        f.write("top-level code ran\\n")
    tmp = os.environ["WORK"]
    rt = erllama_py.start({
        "cache": {"tiers": [{"kind": "ram", "quota_mb": 16}]},
        "daemon": {"log_file": os.path.join(tmp, "log", "script.log")},
    })
    rt.load_model("tiny", model_path=os.environ["MODEL"], n_ctx=256, n_batch=64, n_threads=1)
    rt.load_model("stub", backend="stub", n_ctx=256, n_batch=64)
    result = rt.complete("tiny", "hello world", max_tokens=5)
    stub = rt.complete("stub", "hello world", max_tokens=5)
    print("RESULT " + json.dumps([result.tokens, stub.tokens]))
    rt.stop()
    """
)


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_a_script_without_a_main_guard_can_load_and_run_models(tmp_path, tiny_model_path, how):
    marker = tmp_path / "marker.txt"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        MARKER=str(marker),
        WORK=str(tmp_path),
        MODEL=str(tiny_model_path),
    )
    if how == "file":
        script = tmp_path / "plain_script.py"
        script.write_text(SCRIPT)
        command, stdin = [sys.executable, str(script)], None
    else:
        command, stdin = [sys.executable, "-"], SCRIPT
    done = subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, done.stdout
    tiny_tokens, stub_tokens = json.loads(lines[0].removeprefix("RESULT "))
    assert len(tiny_tokens) == 5 and len(stub_tokens) == 5
    # The workers never imported the script: its top-level code ran once.
    assert marker.read_text().splitlines() == ["top-level code ran"]


def test_a_step_that_fails_without_a_crash_fails_only_its_requests(rt, load):
    # The stub raises ModelError on its third step: the request in that step fails, the
    # worker and the actor stay up, and the next request is served normally.
    m = load(rt, "stub", stub={"fail_on_step": 3})
    pid = m.worker_pid()
    with pytest.raises(erllama_py.ModelError, match="injected failure"):
        m.complete("one two three four", max_tokens=10)
    result = m.complete("one two three four", max_tokens=3)
    assert result.finish_reason == "length"
    assert len(result.tokens) == 3
    assert m.worker_pid() == pid
    assert rt.model_info("m").status == "loaded"


def test_tokenize_waits_for_a_restarting_worker(rt, load, model_kind):
    m = load(rt, model_kind)
    expected = rt.tokenize("m", "hello world")
    os.kill(m.worker_pid(), signal.SIGKILL)
    assert rt.tokenize("m", "hello world") == expected
