"""A failed save never fails a request or a model.

Each fault on the save path is injected in turn: no descriptor or no memory for the
packed state (the arena), no space, a read-only root, an I/O error (the file tier's
write), a tier root removed under the running runtime (a real fault), and a worker that
cannot map the arena (it fails every pack and restore; restores then go cold). Every time the
request completes with the tokens a fault-free run gives, the save is dropped and counted
under its cause, the cause is logged once (not once per request), and the model keeps its
worker.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from erllama_py import Runtime
from erllama_py.cache.filestore import FileStore
from erllama_py.model.arena import Arena
from erllama_py.model.client import WorkerClient

PROMPT = [1, 5, 9, 13, 17, 21, 25, 29]
MAX_TOKENS = 4


def _raise(code: int) -> Callable[..., Any]:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(code, f"injected {errno.errorcode[code]}")

    return fail


@pytest.fixture
def save_rt(make_runtime: Any) -> Runtime:
    return make_runtime()


def _run_twice_under_fault(rt: Runtime, tier: str, load: Any) -> list[Any]:
    """Two requests with prompts of their own, each of which tries to save."""
    m = load(rt, "stub", tier=tier)
    results = [m.complete([*PROMPT, 100 + i], max_tokens=MAX_TOKENS) for i in range(2)]
    rt.cache.wait_idle()
    return results


def _check(
    rt: Runtime, results: list[Any], cause: str, caplog: pytest.LogCaptureFixture, load: Any
) -> None:
    counters = rt.counters()
    assert getattr(counters, f"save_failed_{cause}") >= 2
    assert counters.saves_dropped >= 2
    assert not rt.cache_rows()
    logged = [r for r in caplog.records if f"({cause})" in r.getMessage()]
    assert len([r for r in logged if r.levelno >= logging.WARNING]) == 1
    info = rt.model_info("m")
    assert info.status == "loaded" and info.worker_starts == 1
    # The same prompts on a fault-free reference model give the same tokens.
    ref = load(rt, "stub", "ref", reference=True)
    for i, result in enumerate(results):
        assert result.finish_reason == "length"
        assert result.tokens == ref.complete([*PROMPT, 100 + i], max_tokens=MAX_TOKENS).tokens


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.EMFILE, "no_descriptors"),
        (errno.ENFILE, "no_descriptors"),
        (errno.ENOMEM, "no_memory"),
    ],
)
def test_no_descriptor_or_memory_for_the_packed_state_drops_the_save(
    *,
    save_rt: Runtime,
    load: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: int,
    cause: str,
) -> None:
    caplog.set_level(logging.DEBUG, "erllama_py")
    monkeypatch.setattr(Arena, "allocate", _raise(code))
    results = _run_twice_under_fault(save_rt, "ram", load)
    monkeypatch.undo()
    _check(save_rt, results, cause, caplog, load)


def test_an_arena_with_no_room_left_drops_the_save(
    make_runtime: Any, load: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "erllama_py")
    monkeypatch.setattr(Arena, "__init__", _tiny_arena(Arena.__init__))
    rt = make_runtime()
    results = _run_twice_under_fault(rt, "ram", load)
    _check(rt, results, "no_memory", caplog, load)


def _tiny_arena(init: Callable[..., None]) -> Callable[..., None]:
    def tiny(self: Arena, *_args: Any, **_kwargs: Any) -> None:
        init(self, segment_bytes=4096, max_segments=1)
        self.allocate(4096)  # the one segment is full from the start

    return tiny


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.ENOSPC, "no_space"),
        (errno.EDQUOT, "no_space"),
        (errno.EROFS, "not_writable"),
        (errno.EACCES, "not_writable"),
        (errno.EIO, "io_error"),
    ],
)
@pytest.mark.parametrize("tier", ["ram_file", "disk"])
def test_a_file_tier_that_cannot_be_written_drops_the_save(
    *,
    save_rt: Runtime,
    load: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: int,
    cause: str,
    tier: str,
) -> None:
    # Injected: the suite may run as root, whom a chmod'd root does not stop.
    caplog.set_level(logging.DEBUG, "erllama_py")
    monkeypatch.setattr(FileStore, "write_temp", _raise(code))
    results = _run_twice_under_fault(save_rt, tier, load)
    monkeypatch.undo()
    _check(save_rt, results, cause, caplog, load)
    assert save_rt.cache.check() == []


def test_a_tier_root_removed_under_the_runtime_drops_the_save(
    save_rt: Runtime, load: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "erllama_py")
    shutil.rmtree(tmp_path / "disk")
    results = _run_twice_under_fault(save_rt, "disk", load)
    _check(save_rt, results, "root_missing", caplog, load)


class _EverySegmentSent(set[int]):
    """A client's record of segments sent that claims all of them: the worker is then
    named segments it never mapped, and fails every pack into and restore from them."""

    def __contains__(self, _item: object) -> bool:
        return True


def test_a_worker_that_cannot_map_the_arena_neither_saves_nor_restores_yet_serves(
    *,
    save_rt: Runtime,
    load: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    wait_until: Any,
) -> None:
    caplog.set_level(logging.DEBUG, "erllama_py")
    rt = save_rt
    m = load(rt, "stub", tier="ram")
    first = m.complete(PROMPT, max_tokens=MAX_TOKENS)
    rt.cache.wait_idle()
    assert rt.cache_rows()
    real_init = WorkerClient.__init__

    def init(self: WorkerClient, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self._segments_sent = _EverySegmentSent()

    monkeypatch.setattr(WorkerClient, "__init__", init)
    old = m.worker_pid()
    os.kill(old, signal.SIGKILL)  # its successor has mapped no segment
    wait_until(
        lambda: (
            m.info_now().worker.pid not in (None, old) and m.info_now().worker.state == "running"
        ),
        "the worker runs again",
        30.0,
    )
    before = rt.counters()
    again = m.complete(PROMPT, max_tokens=MAX_TOKENS)  # the exact row cannot be restored
    fresh = m.complete([*PROMPT, 200], max_tokens=MAX_TOKENS)  # nor can it save
    rt.cache.wait_idle()
    grown = rt.counters().since(before)
    assert again.tokens == first.tokens and str(again.cache.kind) == "cold"
    assert fresh.finish_reason == "length" and len(fresh.tokens) == MAX_TOKENS
    assert grown.hits_exact == 0 and grown.misses == 2
    assert grown.save_failed_io_error >= 1 and grown.saves_dropped >= 1
    assert m.info_now().status == "loaded"
