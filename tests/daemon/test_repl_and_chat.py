"""The REPL attached to a daemon, and ``erllama-py chat``, driven through a pseudo-terminal
as a person would: help() lists the helpers, tree() shows the worker's pid, killing the
worker (after confirming) brings a new pid and one more restart, a completion succeeds
after it; a chat's second turn is served partly from the cache; ``status`` and a REPL
attached over HTTP only (``repl --url``) say a single runtime is not on Ray. One daemon for
the module."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from daemon_helpers import cli, daemon_config, env, poll, spawn, tiny_model

from erllama_py.daemon.control_client import SocketControl
from erllama_py.daemon.messages import RowsReply, RowsRequest
from erllama_py.repl import HELPER_NAMES

PROMPT = ">>> "


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Path]:
    path = daemon_config(tmp_path_factory.mktemp("daemon"), [tiny_model(tiny_model_path)])
    started = cli("daemon", "start", "--config", path)
    assert started.returncode == 0, started.stdout + started.stderr
    yield path
    stopped = cli("daemon", "stop", "--config", path)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _worker(text: str) -> tuple[int, int]:
    """The worker's pid and restarts in a drawn tree."""
    match = re.search(r"model:tiny/worker\s+running\s+pid (\d+)(?:\s+restarts (\d+))?", text)
    assert match, text
    return int(match.group(1)), int(match.group(2) or 0)


def _run(repl: pexpect.spawn, line: str) -> str:
    """Type `line` at the prompt; the output up to the next prompt."""
    repl.sendline(line)
    repl.expect_exact(PROMPT)
    out: str = repl.before
    return out


def test_the_repl_shows_a_killed_worker_come_back_and_still_completes(config: Path) -> None:
    repl = spawn("repl", "--config", config)
    try:
        repl.expect("attached to pid \\d+")
        repl.expect_exact(PROMPT)
        helped = _run(repl, "help()")
        for name in HELPER_NAMES:
            assert f"  {name}: " in helped, (name, helped)

        pid, restarts = _worker(_run(repl, "tree()"))
        assert restarts == 0

        repl.sendline('kill("model:tiny/worker")')
        repl.expect_exact("kill model:tiny/worker? [y/N] ")
        repl.sendline("y")
        repl.expect_exact(f"killed model:tiny/worker (process, pid {pid}, restarts 0)")
        repl.expect_exact(PROMPT)
        watched = _run(repl, 'watch("model:tiny/worker")')
        back = re.search(rf"model:tiny/worker is back: pid {pid} -> (\d+), restarts 0 -> 1",
                         watched)  # fmt: skip
        assert back, watched
        new_pid = int(back.group(1))
        assert new_pid != pid
        assert _worker(_run(repl, "tree()")) == (new_pid, 1)

        done = _run(repl, 'complete("tiny", "the cat sat on the", 4)')
        assert re.search(r"\d+ prompt tokens, \d+ from the cache", done), done
        assert "error" not in done

        repl.sendline('kill("model:tiny/actor")')
        repl.expect_exact("kill model:tiny/actor? [y/N] ")
        repl.sendline("n")
        repl.expect_exact("not killed")
        repl.expect_exact(PROMPT)
        assert "error: ChildNotFound" in _run(repl, 'watch("nope")')
        repl.sendeof()
        repl.expect(pexpect.EOF)
    finally:
        repl.close(force=True)


def _rows(config: Path) -> list[dict[str, object]]:
    socket = config.parent / "run" / "control.sock"
    with SocketControl(socket) as control:
        return control.call(RowsRequest(), RowsReply).rows


def test_chat_shows_cached_tokens_on_the_second_turn(config: Path) -> None:
    chat = spawn("chat", "tiny", "--max-tokens", "8", "--config", config)
    try:
        chat.expect_exact("you> ")
        before = len(_rows(config))
        chat.sendline("tell me about the moon")
        chat.expect(r"\[(\d+) prompt tokens, (\d+) cached tokens, \d+ generated\]")
        first_prompt = int(chat.match.group(1))
        chat.expect_exact("you> ")

        # The first turn's saves are published before the second turn is typed.
        def published() -> bool:
            rows = _rows(config)
            return len(rows) > before and all(r["status"] == "available" for r in rows)

        poll(published, "the first turn's rows are published")
        chat.sendline("and the sun")
        chat.expect(r"\[(\d+) prompt tokens, (\d+) cached tokens, \d+ generated\]")
        second_prompt, cached = int(chat.match.group(1)), int(chat.match.group(2))
        assert second_prompt > first_prompt
        assert cached > 0
        chat.expect_exact("you> ")
        chat.sendline("")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


EMBED = """
import erllama_py, erllama_py.repl
rt = erllama_py.start({{
    "cache": {{"tiers": [{{"kind": "ram", "quota_mb": 16}}]}},
    "daemon": {{"log_file": {log!r}}},
    "models": [{{"name": "stub", "backend": "stub", "n_ctx": 512, "n_batch": 64,
                 "stub": {{"n_vocab": 1000}}}}],
}})
try:
    erllama_py.repl.embed(rt)
finally:
    rt.stop()
print("runtime stopped")
"""


def test_embed_opens_the_same_repl_on_an_embedded_runtime(tmp_path: Path) -> None:
    script = EMBED.format(log=str(tmp_path / "log" / "x.log"))
    repl = pexpect.spawn(sys.executable, ["-c", script], encoding="utf-8", timeout=60,
                         env=env(), dimensions=(50, 200))  # fmt: skip
    try:
        repl.expect_exact("erllama-py REPL (embedded runtime)")
        repl.expect_exact(PROMPT)
        helped = _run(repl, "help()")
        assert all(f"  {name}: " in helped for name in HELPER_NAMES), helped
        assert re.search(r"model:stub/worker\s+running\s+pid \d+", _run(repl, "tree()"))
        assert "'idle'" in _run(repl, 'phase("stub")')
        assert "prompt tokens" in _run(repl, 'complete("stub", "a b c", 2)')
        repl.sendline('kill("model:stub/worker")')
        repl.expect_exact("kill model:stub/worker? [y/N] ")  # asks: embed without yes=True
        repl.sendline("n")
        repl.expect_exact("not killed")
        repl.expect_exact(PROMPT)
        repl.sendeof()
        repl.expect_exact("runtime stopped")
        repl.expect(pexpect.EOF)
    finally:
        repl.close(force=True)
    assert repl.exitstatus == 0


def test_the_client_commands_and_their_one_line_errors(config: Path) -> None:
    assert cli("models", "--config", config).stdout.split() == ["tiny"]
    done = cli("complete", "tiny", "the cat sat on the", "--max-tokens", "4", "--config", config)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\[\d+ prompt tokens, \d+ cached tokens, \d+ generated\]", done.stderr)

    tree = cli("tree", "--config", config)
    assert tree.returncode == 0 and re.search(r"model:tiny/worker\s+running\s+pid", tree.stdout)
    stats = cli("cache", "stats", "--config", config)
    assert stats.returncode == 0 and "hits_exact" in json.loads(stats.stdout)
    listed = cli("cache", "ls", "--tier", "ram", "--config", config)
    assert listed.returncode == 0 and re.search(r"^\d+ rows$", listed.stdout, flags=re.M)
    checked = cli("cache", "check", "--config", config)
    assert checked.returncode == 0 and "the cache is sound" in checked.stdout
    gc = cli("cache", "gc", "--config", config)
    assert gc.returncode == 0 and re.match(r"evicted \d+ rows", gc.stdout)
    assert json.loads(cli("cache", "ls", "--json", "--config", config).stdout) == []

    missing = cli("complete", "nope", "hello", "--config", config)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "erllama-py: HTTP 404: model 'nope' is not loaded"
    ]
    nobody_home = cli("tree", "--socket", config.parent / "run" / "absent.sock")
    assert nobody_home.returncode == 1
    assert len(nobody_home.stderr.strip().splitlines()) == 1
    assert "no daemon listens on" in nobody_home.stderr
    assert "--url" in cli("chat", "--help").stdout


def test_a_single_runtime_is_named_as_not_on_ray_by_status_and_an_http_only_repl(
    config: Path,
) -> None:
    shown = cli("status", "--config", config)  # the URL comes from the daemon's status
    assert shown.returncode == 0, shown.stderr
    assert "is not a Ray Serve deployment (no /ray/status)" in shown.stdout
    url = json.loads(cli("daemon", "status", "--json", "--config", config).stdout)["url"]
    assert json.loads(cli("status", "--url", url, "--json").stdout) == {"url": url, "ray": False}

    repl = spawn("repl", "--url", url, "--config", config)
    try:
        repl.expect_exact(f"erllama-py REPL on the server at {url} (HTTP only, no control socket)")
        repl.expect_exact(PROMPT)
        assert "is not a Ray Serve deployment" in _run(repl, "replicas()")
        assert "error: NoControlSocket: ModelsRequest needs a daemon's control socket" in _run(
            repl, "models()"
        )
        assert "prompt tokens" in _run(repl, 'complete("tiny", "the cat sat", 2)')
        repl.sendeof()
        repl.expect(pexpect.EOF)
    finally:
        repl.close(force=True)
    assert repl.exitstatus == 0
