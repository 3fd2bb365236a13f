"""Ten thousand sequential requests leak no memory, descriptors or shared memory.

Each request has a prompt of its own, so each one misses, saves its prompt (cold) and its
context (finish) and pushes older rows out of a small RAM tier: the whole request and
save path runs every time. After a warm-up that fills the tier, the runtime process and
the worker are measured (RSS, open descriptors, memfd descriptors and mappings, threads,
/dev/shm) before and after; run with ``-s`` to see the numbers.

A RAM row is a slot of the runtime's shared-memory arena, which holds two descriptors
(the memfd and mmap's dup) and one mapping per segment, however many rows it holds; the
worker maps each segment once too. So descriptors and mappings must not grow at all.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass

import psutil
import pytest

from erllama_py.model.mapcache import DEFAULT_MAX_ENTRIES as MAPPING_CACHE_ENTRIES

MB = 1024 * 1024
STUB_REQUESTS = 10_000
TINY_REQUESTS = 1000
WARM_UP = 300
RSS_SLACK = 16 * MB  # a leak of 1.6 KB per stub request would exceed it
ARENA_SEGMENTS_USED = 1  # a 1 MB RAM tier fits in the arena's first segment


@dataclass(frozen=True)
class Usage:
    rss: int
    fds: int
    memfd_fds: int
    memfd_maps: int
    shm: int  # descriptors and mappings of /dev/shm files (POSIX shared memory)


def usage(pid: int) -> Usage:
    fds = memfds = shm = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        memfds += target.startswith("/memfd:")
        shm += target.startswith("/dev/shm/")
    memfd_maps = 0
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            memfd_maps += "/memfd:" in line
            shm += "/dev/shm/" in line
    return Usage(psutil.Process(pid).memory_info().rss, fds, memfds, memfd_maps, shm)


@dataclass(frozen=True)
class Snapshot:
    runtime: Usage
    worker: Usage
    rows: int
    threads: int


def snapshot(rt, name: str) -> Snapshot:
    rt.cache.wait_idle()
    gc.collect()
    pid = rt.model_info(name).worker.pid
    rows = sum(1 for r in rt.cache_rows() if r.tier == "ram")
    return Snapshot(
        runtime=usage(os.getpid()),
        worker=usage(pid),
        rows=rows,
        threads=threading.active_count(),
    )


def report(label: str, n: int, seconds: float, before: Snapshot, after: Snapshot) -> None:
    mb = 1 / MB
    print(
        f"\n{label}: {n} requests in {seconds:.1f} s ({n / seconds:.0f}/s)\n"
        f"  runtime RSS {before.runtime.rss * mb:.1f} -> {after.runtime.rss * mb:.1f} MB, "
        f"fds {before.runtime.fds} -> {after.runtime.fds} "
        f"(RAM rows {before.rows} -> {after.rows}), "
        f"memfd fds {before.runtime.memfd_fds} -> {after.runtime.memfd_fds}, "
        f"memfd maps {before.runtime.memfd_maps} -> {after.runtime.memfd_maps}, "
        f"threads {before.threads} -> {after.threads}\n"
        f"  worker RSS {before.worker.rss * mb:.1f} -> {after.worker.rss * mb:.1f} MB, "
        f"fds {before.worker.fds} -> {after.worker.fds}, "
        f"memfd fds {before.worker.memfd_fds} -> {after.worker.memfd_fds}, "
        f"memfd maps {before.worker.memfd_maps} -> {after.worker.memfd_maps}; "
        f"/dev/shm files open or mapped: runtime {after.runtime.shm}, worker {after.worker.shm}"
    )


def assert_no_leak(before: Snapshot, after: Snapshot) -> None:
    assert after.runtime.rss - before.runtime.rss < RSS_SLACK
    assert after.worker.rss - before.worker.rss < RSS_SLACK
    assert after.runtime.fds - before.runtime.fds <= 2
    assert after.runtime.memfd_maps - before.runtime.memfd_maps <= 0
    # Only the arena's segments hold state memory: no new one while the tier churns.
    assert after.runtime.memfd_fds == before.runtime.memfd_fds <= 2 * ARENA_SEGMENTS_USED
    # The worker maps the arena's segments, and keeps a bounded cache of mappings of the
    # pooled buffers it restored file rows from (erllama_py.model.mapcache).
    assert after.worker.fds - before.worker.fds <= 2 * MAPPING_CACHE_ENTRIES + 1
    assert after.worker.memfd_fds <= 2 * (MAPPING_CACHE_ENTRIES + ARENA_SEGMENTS_USED)
    assert after.worker.memfd_maps <= MAPPING_CACHE_ENTRIES + ARENA_SEGMENTS_USED
    assert after.threads - before.threads <= 1
    assert after.runtime.shm == after.worker.shm == 0


@pytest.fixture
def leak_rt(make_runtime):
    """A runtime with a 1 MB RAM tier only: it fills during the warm-up, then churns."""
    return make_runtime(cache={"tiers": [{"kind": "ram", "quota_mb": 1}]})


def run(rt, name: str, label: str, n: int, max_tokens: int) -> tuple[Snapshot, Snapshot]:
    for i in range(WARM_UP):
        rt.complete(name, f"warm up {i} now", max_tokens=max_tokens)
    before = snapshot(rt, name)
    started = time.perf_counter()
    for i in range(n):
        result = rt.complete(name, f"probe {i} here", max_tokens=max_tokens)
        assert len(result.tokens) == max_tokens
    seconds = time.perf_counter() - started
    after = snapshot(rt, name)
    report(label, n, seconds, before, after)
    counters = rt.counters()
    print(
        f"  cache: {counters.misses} misses, {counters.hits_prefix} prefix hits, "
        f"{counters.saves_cold} cold and {counters.saves_finish} finish saves, "
        f"{counters.evictions} evictions"
    )
    # (Nearly) every request saved its context, and the tier churned all along; the odd
    # stub prompt repeats an earlier one (its words hash into 2,048 ids) and hits instead.
    assert counters.saves_finish >= 0.95 * (n + WARM_UP)
    assert counters.evictions >= n
    return before, after


def test_ten_thousand_stub_requests_leak_no_memory_descriptors_or_shared_memory(leak_rt, load):
    load(leak_rt, "stub", n_seq_max=2, n_ctx=128, n_batch=32, stub={"n_vocab": 2048})
    before, after = run(leak_rt, "m", "stub", STUB_REQUESTS, max_tokens=3)
    assert_no_leak(before, after)
    assert leak_rt.model_info("m").requests_done == STUB_REQUESTS + WARM_UP


def test_a_thousand_tiny_model_requests_leak_nothing(leak_rt, load):
    load(leak_rt, "tiny", n_seq_max=2, n_ctx=128, n_batch=32)
    before, after = run(leak_rt, "m", "tiny llama", TINY_REQUESTS, max_tokens=3)
    assert_no_leak(before, after)
