"""Cache I/O through the public facade, next to raw file I/O on the same file system.

Run from the repository root::

    .venv/bin/python -m bench.cache_io [--runs 5] [--sizes 1,16,128] [--rows 10000]

For each tier (``ram``; ``ram_file`` on a fresh folder of /dev/shm; ``disk`` on a
fresh folder of the user's home, else /tmp) and each payload size, in one run:

- *save*: ``cache.save(ns, tokens, payload, tier=...)``, which returns once the row
  is published (framed, written, data-synced, linked, directory-synced, announced);
- *load*: ``claim``, ``load`` with the default allocator (a fresh bytearray, payload
  checksum and key verified), ``checkin``;
- *raw*, on the same file system, same bytes: ``os.write`` + ``os.fdatasync`` of a
  new file, and ``readinto`` a fresh bytearray; for the RAM tier, a copy into a fresh
  bytearray.

Each figure is the median of ``--runs`` runs (up to 20 for small payloads), raw and
facade alternating which goes first. Loads read
from the page cache, as they do in service; the ``disk, cold`` rows drop the file's
cached pages first (``posix_fadvise(DONTNEED)``). The cache runs with
``promote_on_hit`` and ``demote_on_evict`` off so that no background copy competes
with the timed call. Then a longest-prefix lookup of a 30,000-token prompt over
``--rows`` rows through the facade. Prints a markdown report and writes it to
``bench/results/cache_io.md`` (``--output DIR``: ``DIR/cache_io.md``; ``--dirty``:
see bench/common.py). 1 MB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import erllama_py.cache
from bench.common import command_line, header, result_options, write_result
from erllama_py.cache import CacheHandle, Namespace, ctx_params_hash
from erllama_py.config import CacheSettings, TierSettings

MB = 1 << 20
GB = 1 << 30
REPO = Path(__file__).resolve().parents[1]
NAME = "cache_io"
NS = Namespace(bytes(range(32)), "q4_k_m", ctx_params_hash(n_ctx=32768))
GOAL_RATIO = 1.5  # facade time / raw time
GOAL_PREFIX_MS = 1.0


# ---------------------------------------------------------------- helpers


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def filesystem_of(path: Path) -> str:
    """``<type> on <mount point>`` of the mount holding `path`."""
    best = ("?", "/")
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            mount, kind = fields[1], fields[2]
            if str(path).startswith(mount.rstrip("/") + "/") and len(mount) >= len(best[1]):
                best = (kind, mount)
    return f"{best[0]} on {best[1]}"


def drop_page_cache(path: Path) -> None:
    """Forget a synced file's cached pages, so the next read goes to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def tier_roots() -> Iterator[tuple[Path, Path]]:
    """Fresh ram_file (/dev/shm) and disk (home, else /tmp) folders, removed afterwards."""
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    home = Path.home()
    disk_parent = home if os.access(home, os.W_OK) else None
    ram_file = Path(tempfile.mkdtemp(prefix="erllama-bench-cache-io-", dir=shm))
    disk = Path(tempfile.mkdtemp(prefix=".erllama-bench-cache-io-", dir=disk_parent))
    try:
        yield ram_file, disk
    finally:
        shutil.rmtree(ram_file, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


# ---------------------------------------------------------------- raw I/O


def raw_write(path: Path, data: bytes) -> None:
    """A new file, every byte written, data-synced, closed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fdatasync(fd)
    finally:
        os.close(fd)


def raw_read(path: Path) -> bytearray:
    """The whole file, read into a fresh bytearray."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            got = f.readinto(view[done:])
            if not got:
                break
            done += got
    return buf


def raw_copy(data: bytes) -> bytearray:
    """The RAM tier's baseline: the bytes copied into a fresh bytearray."""
    buf = bytearray(len(data))
    memoryview(buf)[:] = data
    return buf


# ---------------------------------------------------------------- throughput


@dataclass
class Sample:
    """Seconds per operation, for the facade and the raw baseline."""

    save: list[float]
    load: list[float]
    raw_save: list[float]
    raw_load: list[float]


def facade_load(cache: CacheHandle, key: bytes) -> int:
    claim = cache.claim(key)
    if claim is None:
        raise RuntimeError("the row vanished")
    try:
        view = cache.load(claim)
        if view is None:
            raise RuntimeError("the row failed to load")
        return view.nbytes
    finally:
        cache.checkin(claim)


def measure(
    cache: CacheHandle, kind: str, root: Path | None, data: bytes, runs: int, *, cold: bool
) -> Sample:
    """`runs` saves and loads of `data` in tier `kind`, each next to its raw baseline.

    Raw and facade alternate which goes first, run by run.
    """
    sample = Sample([], [], [], [])
    for run in range(runs):
        tokens = [len(data) % (1 << 32), run, int(cold), *range(30)]
        raw = None if root is None else root / f"raw-{run}.bin"
        key = b""

        def save(tokens: list[int] = tokens) -> None:
            nonlocal key
            key = cache.save(NS, tokens, data, tier=kind)

        def raw_save(raw: Path | None = raw) -> None:
            if raw is None:
                raw_copy(data)
            else:
                raw_write(raw, data)

        def raw_load(raw: Path | None = raw) -> None:
            if raw is None:
                raw_copy(data)
            else:
                raw_read(raw)

        first, second = (raw_save, save) if run % 2 == 0 else (save, raw_save)
        times = {first: timed(first), second: timed(second)}
        sample.raw_save.append(times[raw_save])
        sample.save.append(times[save])
        if cold and raw is not None:
            info = cache.lookup_key(key)
            drop_page_cache(raw)
            if info is not None and info.path is not None:
                drop_page_cache(info.path)

        def load(key: bytes = key) -> None:
            facade_load(cache, key)

        first, second = (raw_load, load) if run % 2 == 0 else (load, raw_load)
        times = {first: timed(first), second: timed(second)}
        sample.raw_load.append(times[raw_load])
        sample.load.append(times[load])
        if raw is not None:
            raw.unlink()
        cache.gc()  # free the tier before the next run (outside the timings)
        # Commit the deletions now (ext4 may discard freed blocks at the next journal
        # commit), so that neither timed write of the next run pays for them.
        os.sync()
    return sample


def runs_for(size_mb: int, runs: int) -> int:
    """More runs for small payloads, whose times are short and noisy: at least `runs`.

    Even, so that raw and facade go first equally often.
    """
    n = max(runs, min(20, 128 // max(1, size_mb)))
    return n + n % 2


def mb_s(size: int, seconds: list[float]) -> float:
    return size / MB / median(seconds)


def throughput_rows(
    cache: CacheHandle, roots: tuple[Path, Path], sizes_mb: list[int], runs: int
) -> tuple[list[list[object]], list[float]]:
    ram_file, disk = roots
    tiers: list[tuple[str, str, Path | None, bool]] = [
        ("ram", "ram", None, False),
        ("ram_file", "ram_file", ram_file, False),
        ("disk", "disk", disk, False),
        ("disk, cold", "disk", disk, True),
    ]
    rows: list[list[object]] = []
    ratios: list[float] = []
    for size_mb in sizes_mb:
        data = np.random.default_rng(size_mb).bytes(size_mb * MB)
        n = runs_for(size_mb, runs)
        for label, kind, root, cold in tiers:
            s = measure(cache, kind, root, data, n, cold=cold)
            size = len(data)
            save_ratio = median(s.save) / median(s.raw_save)
            load_ratio = median(s.load) / median(s.raw_load)
            if root is not None:
                if not cold:
                    ratios.append(save_ratio)
                ratios.append(load_ratio)
            baseline = "copy" if root is None else "write+fdatasync / readinto"
            save_extra = (median(s.save) - median(s.raw_save)) * 1e3
            load_extra = (median(s.load) - median(s.raw_load)) * 1e3
            row: list[object] = [
                f"{size_mb} MB",
                label,
                n,
                f"{mb_s(size, s.save):,.0f}" if not cold else "-",
                f"{mb_s(size, s.raw_save):,.0f}" if not cold else "-",
                f"{save_ratio:.2f}" if not cold else "-",
                f"{save_extra:+.2f}" if not cold else "-",
                f"{mb_s(size, s.load):,.0f}",
                f"{mb_s(size, s.raw_load):,.0f}",
                f"{load_ratio:.2f}",
                f"{load_extra:+.2f}",
                baseline,
            ]
            rows.append(row)
            print(" | ".join(str(c) for c in row), file=sys.stderr, flush=True)
    return rows, ratios


# ---------------------------------------------------------------- longest prefix


def prefix_section(n_rows: int, runs: int) -> tuple[str, float]:
    """Time `longest_prefix` of a 30,000-token prompt over `n_rows` rows (RAM tier)."""
    rng = np.random.default_rng(1)

    def tokens(n: int) -> np.ndarray:
        return rng.integers(0, 50_000, n, dtype=np.uint32)

    cache = erllama_py.cache.start(
        CacheSettings(tiers=(TierSettings("ram", 8 * GB),), writers=1, promote_on_hit=False)
    )
    try:
        system = tokens(1000)
        conversations = [np.concatenate([system, tokens(29_000)]) for _ in range(n_rows // 100)]
        started = time.perf_counter()
        for conversation in conversations:  # a row every 290 tokens after the system prompt
            for point in range(1, 101):
                cut = 1000 + 290 * point
                cache.save(NS, conversation[:cut].astype("<u4").tobytes(), b"state", tier="ram")
        build_s = time.perf_counter() - started
        prompt = np.concatenate([conversations[len(conversations) // 2][:29_500], tokens(500)])
        prompt_bytes = prompt.astype("<u4").tobytes()
        prompt_list = prompt.tolist()
        unrelated = tokens(30_000).astype("<u4").tobytes()
        hit = cache.longest_prefix(NS, prompt_bytes)
        covered = hit.covered.n_tokens if hit is not None and hit.covered is not None else 0
        series = {
            "`longest_prefix`, prompt as u32 bytes": lambda: cache.longest_prefix(NS, prompt_bytes),
            "`longest_prefix`, prompt as a list of ints (encoding included)": (
                lambda: cache.longest_prefix(NS, prompt_list)
            ),
            "`longest_prefix_stride` (stride 2048, min 512), for comparison": (
                lambda: cache.longest_prefix_stride(NS, prompt_bytes, 2048, 512)
            ),
            "`longest_prefix`, unrelated prompt": lambda: cache.longest_prefix(NS, unrelated),
        }
        rows = []
        main_ms = float("nan")
        for name, fn in series.items():
            times = [timed(fn) for _ in range(runs)]
            ms = median(times) * 1e3
            if name.startswith("`longest_prefix`, prompt as u32"):
                main_ms = ms
            rows.append([name, f"{ms:.3f}", f"{max(times) * 1e3:.3f}"])
        text = "\n".join(
            [
                f"## Longest prefix: a 30,000-token prompt over {len(cache.rows()):,} rows",
                "",
                f"{len(conversations)} conversations share a 1,000-token system prompt and "
                "have a row every 290 tokens up to 30,000 (RAM tier, saved through the "
                f"facade in {build_s:.1f} s); the prompt extends one of them past its last "
                f"row (covered row: {covered:,} tokens). Median and max of {runs} calls.",
                "",
                table(["call", "median ms", "max ms"], rows),
            ]
        )
        return text, main_ms
    finally:
        cache.stop()


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="runs per figure (median)")
    parser.add_argument("--sizes", default="1,16,128", help="payload sizes in MB")
    parser.add_argument("--rows", type=int, default=10_000, help="rows for the prefix lookup")
    parser.add_argument("--prefix-runs", type=int, default=200)
    result_options(parser)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    top = header(
        "Cache I/O: the facade against raw file I/O",
        command_line(NAME),
        dirty_ok=args.dirty,
        model=False,
    )
    with tier_roots() as (ram_file, disk):
        largest = max(sizes) * MB
        cache = erllama_py.cache.start(
            CacheSettings(
                tiers=(
                    TierSettings("ram", 4 * largest),
                    TierSettings("ram_file", 4 * largest, ram_file),
                    TierSettings("disk", 4 * largest, disk),
                ),
                writers=2,
                promote_on_hit=False,
                demote_on_evict=False,
            )
        )
        try:
            rows, ratios = throughput_rows(cache, (ram_file, disk), sizes, args.runs)
        finally:
            cache.stop()
        where = {"ram_file": filesystem_of(ram_file), "disk": filesystem_of(disk)}
    prefix_text, prefix_ms = prefix_section(args.rows, args.prefix_runs)
    worst = max(ratios) if ratios else float("nan")
    report = top + "\n".join(
        [
            f"- ram_file root: {where['ram_file']}; disk root: {where['disk']}",
            "- each figure is the median of its row's runs (more runs for small payloads); "
            "1 MB = 2**20 bytes",
            "",
            "Save: `cache.save` until the row is published, against `os.write` + "
            "`os.fdatasync` of a new file. Load: `claim` + `load` (default allocator, "
            "checksum and key verified) + `checkin`, against `readinto` a fresh bytearray. "
            "RAM: against a copy into a fresh bytearray (a RAM save of immutable `bytes` "
            "keeps them by reference and a RAM load returns a view: neither copies). "
            "Ratio = facade time / raw time; goal <= 1.5 for the file tiers. Extra = facade "
            "time - raw time, in ms: a per-call cost shows up as the same extra at every size.",
            "",
            table(
                [
                    "payload",
                    "tier",
                    "runs",
                    "save MB/s",
                    "raw save MB/s",
                    "save ratio",
                    "save extra ms",
                    "load MB/s",
                    "raw load MB/s",
                    "load ratio",
                    "load extra ms",
                    "raw baseline",
                ],
                rows,
            ),
            "",
            f"Worst file-tier ratio: {worst:.2f} (goal <= {GOAL_RATIO}).",
            "",
            prefix_text,
            "",
            f"Goal: under {GOAL_PREFIX_MS:.0f} ms; measured {prefix_ms:.3f} ms.",
        ]
    )
    write_result(NAME, report, args.output, dirty_ok=args.dirty)


if __name__ == "__main__":
    main()
