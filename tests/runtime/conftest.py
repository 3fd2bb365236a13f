"""Fixtures for the runtime suite: runtimes on tmp dirs, always stopped, and models on them.

Every runtime has the three kinds of cache tier (a RAM tier, and a ``ram_file`` and a
``disk`` tier under ``tmp_path``), writes its workers' logs under ``tmp_path``, and uses
a save policy with small thresholds so that prompts of a few tokens are saved.

Models come in two kinds, and the `model` fixture is parametrised over both (as Pykka's
own suite runs every test on every runtime):

- ``stub``: the deterministic stub backend (a worker process without llama.cpp);
- ``tiny``: the tiny random-weight llama GGUF on real llama.cpp, written once per session.

llama.cpp runs with one thread: on a shared 2-core machine, a thread pool as large as
the machine spins at every barrier while the other thread is descheduled, and small
decodes get 50 times slower.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil
import pytest

import erllama_py
from erllama_py import ModelInfo, Runtime
from erllama_py.model.testmodel import write_test_model

ModelKind = Literal["stub", "tiny"]
MODEL_KINDS: tuple[ModelKind, ...] = ("stub", "tiny")

# Small thresholds: every prompt of 4 tokens or more gets a cold save at its full length.
POLICY: dict[str, int] = {
    "min_tokens": 4,
    "cold_min_tokens": 4,
    "boundary_trim_tokens": 0,
    "boundary_align_tokens": 1,
}
# Model options of the `model` fixture (and the default of `load`).
N_CTX = 512
N_BATCH = 64
N_SEQ_MAX = 4
STUB_N_VOCAB = 1000  # token-list prompts below 394 (the tiny vocabulary) fit both kinds


def runtime_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A runtime configuration rooted in `tmp_path` (mapping overrides replace sections)."""
    config: dict[str, Any] = {
        "cache": {
            "tiers": [
                {"kind": "ram", "quota_mb": 64},
                {"kind": "ram_file", "root": str(tmp_path / "ram_file"), "quota_mb": 64},
                {"kind": "disk", "root": str(tmp_path / "disk"), "quota_mb": 128},
            ],
        },
        "policy": dict(POLICY),
        "daemon": {
            "log_file": str(tmp_path / "log" / "erllama-py.log"),
            "pid_file": str(tmp_path / "erllama-py.pid"),
            "control_socket": str(tmp_path / "control.sock"),
        },
    }
    config.update(overrides)
    return config


class MakeRuntime(Protocol):
    """Start a runtime on `tmp_path` (or `root`); it is stopped after the test."""

    def __call__(self, root: Path | None = ..., **overrides: Any) -> Runtime: ...


def _worker_children() -> set[int]:
    with contextlib.suppress(psutil.Error):
        return {p.pid for p in psutil.Process().children(recursive=True)}
    return set()


def _wait_until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll `predicate` every few milliseconds; fail the test with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(0.005)


def _wait_for_exit(pids: set[int], timeout: float = 10.0) -> set[int]:
    """Wait until none of `pids` is alive (or a zombie); return those still running."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _running(p)}
        if alive:
            time.sleep(0.01)
    return alive


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class WaitUntil(Protocol):
    """Poll `predicate` until it is true; fail the test with `what` after `timeout` s."""

    def __call__(
        self, predicate: Callable[[], object], what: str, timeout: float = ...
    ) -> None: ...


@pytest.fixture
def wait_until() -> WaitUntil:
    """Poll a predicate every 5 ms (bounded); fail the test naming what was awaited."""
    return _wait_until


@dataclass(frozen=True)
class Children:
    """The processes this test process started (the context workers)."""

    def running(self) -> set[int]:
        """Pids of child processes that still run (zombies excluded)."""
        return {p for p in _worker_children() if _running(p)}

    def wait_gone(self, pids: set[int], timeout: float = 10.0) -> set[int]:
        """Wait until none of `pids` runs; return those still running after `timeout` s."""
        return _wait_for_exit(pids, timeout)


@pytest.fixture
def children() -> Children:
    """Inspect the child processes of the test process (psutil)."""
    return Children()


@pytest.fixture
def make_runtime(tmp_path: Path) -> Iterator[MakeRuntime]:
    """Start runtimes on tmp dirs; every one is stopped after the test, workers reaped."""
    started: list[Runtime] = []

    def make(root: Path | None = None, **overrides: Any) -> Runtime:
        rt = erllama_py.start(runtime_config(root or tmp_path, **overrides))
        started.append(rt)
        return rt

    before = _worker_children()
    yield make
    for rt in reversed(started):
        rt.stop()
    # Leave no worker behind for the next test's process counts.
    _wait_for_exit(_worker_children() - before)


@pytest.fixture
def rt(make_runtime: MakeRuntime) -> Runtime:
    """A running runtime on tmp dirs (ram, ram_file and disk tiers), stopped after the test."""
    return make_runtime()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight llama GGUF (seed 0), written once per test session."""
    return write_test_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)


class Load(Protocol):
    """Load a model of `kind` under `name` into `rt` (the `model` fixture's defaults).

    ``reference=True`` makes it a cold reference: its own cache namespace and no saves,
    so every request on it is a cold run.
    """

    def __call__(
        self,
        rt: Runtime,
        kind: ModelKind,
        name: str = ...,
        *,
        reference: bool = ...,
        **options: Any,
    ) -> Model: ...


@dataclass
class Model:
    """A loaded model and what the tests need to know about it."""

    rt: Runtime
    name: str
    kind: ModelKind
    info: ModelInfo

    @property
    def n_vocab(self) -> int:
        return int(self.info.n_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.info.n_ctx)

    def complete(self, prompt: str | list[int], **options: Any) -> dict[str, Any]:
        return self.rt.complete(self.name, prompt, **options)

    def tokens(self, text: str, add_special: bool = True) -> list[int]:
        return self.rt.tokenize(self.name, text, add_special)

    def info_now(self) -> ModelInfo:
        return self.rt.model_info(self.name)

    def worker_pid(self) -> int:
        pid = self.rt.model_info(self.name).worker.pid
        assert isinstance(pid, int), f"model {self.name} has no running worker"
        return pid


def load_options(kind: ModelKind, tiny_model_path: Path, **options: Any) -> dict[str, Any]:
    """`load_model` options for a model of `kind` (defaults of the `model` fixture)."""
    out: dict[str, Any] = {"n_ctx": N_CTX, "n_batch": N_BATCH, "n_seq_max": N_SEQ_MAX}
    if kind == "stub":
        stub: dict[str, Any] = {"n_vocab": STUB_N_VOCAB}
        stub.update(options.pop("stub", {}))
        out.update(backend="stub", stub=stub)
    else:
        out.update(model_path=tiny_model_path, n_threads=1)
    out.update(options)
    return out


@pytest.fixture(scope="session")
def load(tiny_model_path: Path) -> Load:
    """Load models by kind with the suite's defaults (see `load_options`)."""

    def do(
        rt: Runtime, kind: ModelKind, name: str = "m", *, reference: bool = False, **options: Any
    ) -> Model:
        opts = load_options(kind, tiny_model_path, **options)
        if reference:
            opts = _isolated(opts)
        info = rt.load_model(name, **opts).info()
        return Model(rt, name, kind, info)

    return do


@pytest.fixture(params=MODEL_KINDS)
def model_kind(request: pytest.FixtureRequest) -> ModelKind:
    """``stub`` and ``tiny``: a test using it runs once on each."""
    kind: ModelKind = request.param
    return kind


@pytest.fixture
def model(rt: Runtime, load: Load, model_kind: ModelKind) -> Model:
    """Model ``m`` on `rt`: the stub or the tiny llama model (n_ctx 512, n_batch 64, 4 seqs)."""
    return load(rt, model_kind)


def _isolated(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options making a model a cold reference: its own cache namespace, and no saves."""
    out = dict(options)
    out["fingerprint"] = os.urandom(32).hex()
    out["policy"] = {"min_tokens": 10**9, "cold_min_tokens": 10**9, "cold_max_tokens": 10**9}
    return out


def _assert_cache_sound(rt: Runtime) -> int:
    rt.cache.wait_idle(30.0)
    assert rt.cache.check() == []
    loaded = 0
    for row in rt.cache_rows():
        if row.status != "available":
            continue
        payload = rt.cache.fetch(row.key)
        assert payload, f"row {row} does not load"
        loaded += 1
    return loaded


@pytest.fixture
def assert_cache_sound() -> Callable[[Runtime], int]:
    """Check that the index and tiers agree and every available row loads (checksum and
    key verified); returns how many rows were loaded."""
    return _assert_cache_sound


@pytest.fixture(scope="module")
def module_rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """One runtime for a whole test module (same tiers and policy), stopped after it.

    For tests that neither break a model nor depend on what the cache holds beyond
    prompts of their own (argument validation, result shapes, exactness by tier).
    """
    before = _worker_children()
    rt = erllama_py.start(runtime_config(tmp_path_factory.mktemp("module")))
    yield rt
    rt.stop()
    _wait_for_exit(_worker_children() - before)


@pytest.fixture(scope="module")
def served_models(module_rt: Runtime, load: Load) -> dict[ModelKind, Model]:
    """The module runtime with a stub and a tiny model loaded (named ``stub``, ``tiny``)."""
    return {kind: load(module_rt, kind, kind) for kind in MODEL_KINDS}


@pytest.fixture
def served(served_models: dict[ModelKind, Model], model_kind: ModelKind) -> Model:
    """The module runtime's stub or tiny model (parametrised like `model`)."""
    return served_models[model_kind]
