"""Crash safety of the file tiers: SIGKILLs at random moments, bit flips, truncations, races.

- A child process (``python -c``, never a fork of the test process) saves rows in a loop
  and is SIGKILLed at random moments, many times. After every kill a fresh cache on the
  same roots must list no temp file, load every row it lists with a valid checksum and
  exactly the payload its tokens imply (never a torn or foreign payload), count no
  corrupt file, keep the last row the child saw published, and pass `check()`.
- Bit flips (anywhere but the 4-byte hit count) and truncations are detected, at the
  startup scan or at load, counted in ``corrupt_files``, deleted, and never served.
- Two writers racing on one key with different payloads, in two caches of one process
  and in two processes: exactly one file is published, it is valid and whole, and the
  loser adopted it.

The payload of a row is derived from its tokens (`expected_payload`), so any process can
verify any row it finds.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import xxhash

import erllama_py.cache
from erllama_py.cache import CacheHandle, Namespace, SaveTicket, ctx_params_hash, key_hex, kvc
from erllama_py.cache.key import decode_tokens, make_key
from erllama_py.cache.rootlock import RootLocks
from erllama_py.config import CacheSettings, TierSettings
from erllama_py.errors import CacheFormatError, ReservationError, TierFullError

KB = 1024
MB = 1024 * KB
REPO = Path(__file__).resolve().parents[2]
NS = Namespace(bytes(range(32)), "q8_0", ctx_params_hash(n_ctx=8192))
DISK_QUOTA = 24 * MB
RAM_FILE_QUOTA = 6 * MB
MAX_PAYLOAD = 3 * MB
MAX_IN_FLIGHT = 3  # saves; with MAX_PAYLOAD they can never evict the newest disk row
KILLS = 32


# --------------------------------------------------------------------------- rows


def row_tokens(row_id: int, rng: random.Random) -> list[int]:
    """Tokens of a row: its id, its payload size, then filler (2 to 40 tokens)."""
    size = min(MAX_PAYLOAD, int(2 ** rng.uniform(0, 21.6)))  # 1 byte .. 3 MB, log-uniform
    return [row_id, size, *(rng.randrange(2**32) for _ in range(rng.randrange(39)))]


def expected_payload(tokens: list[int]) -> bytes:
    """The one payload a row with these tokens may hold."""
    rng = np.random.default_rng(tokens[:4])
    return rng.bytes(tokens[1])


def crash_settings(disk: Path, ram_file: Path, **options: Any) -> CacheSettings:
    return CacheSettings(
        tiers=(
            TierSettings("ram_file", RAM_FILE_QUOTA, ram_file),
            TierSettings("disk", DISK_QUOTA, disk),
        ),
        writers=2,
        promote_on_hit=False,
        **options,
    )


def _say(out: IO[str], *words: object) -> None:
    out.write(" ".join(map(str, words)) + "\n")
    out.flush()


def saver_main() -> None:
    """Child process: save rows forever (until killed); report each publication.

    argv: disk root, ram_file root, first row id, seed.
    """
    disk, ram_file, first, seed = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:5])
    rng = random.Random(seed)
    cache = erllama_py.cache.start(crash_settings(disk, ram_file))
    _say(sys.stdout, "ready")
    pending: list[SaveTicket] = []
    history: list[list[int]] = []
    row_id = first
    while True:
        if history and rng.random() < 0.1:  # the same key again: already_present
            tokens = rng.choice(history)
        else:
            row_id += 1
            tokens = row_tokens(row_id, rng)
            history.append(tokens)
        tier = "ram_file" if rng.random() < 0.3 else "disk"
        try:
            pending.append(cache.save_async(NS, tokens, expected_payload(tokens), tier=tier))
        except ReservationError as exc:  # that key is still in flight: a legitimate refusal
            _say(sys.stdout, "refused", exc.reason)
        except TierFullError:  # the ram_file tier is all in flight: a legitimate refusal
            _say(sys.stdout, "refused", "tier_full")
        while len(pending) >= MAX_IN_FLIGHT or (pending and rng.random() < 0.3):
            ticket = pending.pop(0)
            result = ticket.result(60)
            _say(sys.stdout, "saved", ticket.tier.split(":")[0], key_hex(ticket.key), result.status)
        if rng.random() < 0.2:  # hits rewrite headers in place (ram_file rows only)
            ram_rows = [r for r in cache.rows() if r.kind == "ram_file" and r.status == "available"]
            if ram_rows:
                claim = cache.claim(rng.choice(ram_rows).key)
                if claim is not None:
                    cache.load(claim)
                    cache.checkin(claim)


def racer_main() -> None:
    """Child process: save the key each stdin line names, with this child's payload.

    argv: disk root, racer id. Replies ``<round> <status> <xxh3 of what it then loads>``.
    """
    disk, racer = Path(sys.argv[1]), int(sys.argv[2])
    # Two racers on one root: past the root lock that refuses a second runtime there, so
    # that the publish protocol itself is what keeps the files whole.
    RootLocks.acquire = lambda _self, _cache: None  # type: ignore[method-assign]
    cache = erllama_py.cache.start(
        CacheSettings(tiers=(TierSettings("disk", 256 * MB, disk),), writers=1)
    )
    _say(sys.stdout, "ready")
    try:
        for line in sys.stdin:
            round_no = int(line)
            tokens, body = race_row(round_no, racer)
            try:
                status = cache.save_async(NS, tokens, body, tier="disk").result(60).status
            except Exception as exc:  # reported to the test, which fails on it
                status = f"error:{type(exc).__name__}:{exc}".replace(" ", "_")
            loaded = cache.fetch(make_key(NS, tokens))
            digest = "none" if loaded is None else xxhash.xxh3_64_hexdigest(loaded)
            _say(sys.stdout, round_no, status, digest)
    finally:
        cache.stop()


def race_row(round_no: int, racer: int) -> tuple[list[int], bytes]:
    """The key of a round (same for every racer) and this racer's own payload."""
    size = 64 * KB + random.Random(round_no * 2 + racer).randrange(512 * KB)
    return [round_no, 424242], np.random.default_rng([round_no, racer]).bytes(size)


def spawn(entry: str, *args: object, log: Path | None = None) -> subprocess.Popen[str]:
    """Run `entry` of this module in a new Python process (not a fork)."""
    code = f"from tests.cache.test_crash_safety import {entry}; {entry}()"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out: Any = subprocess.PIPE if log is None else log.open("w")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=None if log is None else subprocess.STDOUT,
            text=True,
        )
    finally:
        if log is not None:
            out.close()


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The child's stdout lines, read by a thread, so that the test waits with a timeout."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes started by a test; any still running is killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def verify_tiers(cache: CacheHandle, roots: list[Path]) -> list[bytes]:
    """Every row a fresh cache lists is whole and exact; returns the listed keys."""
    for root in roots:
        assert list(root.glob("*.tmp")) == [], f"temp files left in {root}"
    rows = cache.rows()
    assert all(r.status == "available" for r in rows)
    for info in rows:
        assert info.path is not None and info.path.name == f"{info.key_hex}.kvc"
        header, on_disk = kvc.read_file(info.path, expected_key=info.key)
        tokens = header.tokens
        assert make_key(NS, tokens) == info.key
        claim = cache.claim(info.key)
        assert claim is not None
        try:
            loaded = cache.load(claim)
        finally:
            cache.checkin(claim)
        assert loaded is not None, f"row {info.key_hex} listed but not loadable"
        expected = expected_payload(tokens)
        assert bytes(loaded) == expected == bytes(on_disk), f"foreign payload in {info.key_hex}"
    listed = {r.path.name for r in rows if r.path is not None}
    for root in roots:
        assert {p.name for p in root.glob("*.kvc")} <= listed
    return [r.key for r in rows]


def wait_for_line(log: Path, prefix: str, proc: subprocess.Popen[str], timeout: float) -> bool:
    """Poll the child's log for a line starting with `prefix`; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and any(line.startswith(prefix) for line in log.read_text().splitlines()):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    pytest.fail(f"the child printed no {prefix!r} line in {timeout} s")


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkilled_savers_leave_only_whole_rows_that_a_fresh_cache_loads_exactly(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    disk, ram_file = tmp_path / "disk", tmp_path / "ramfile"
    rng = random.Random(20240611)
    stats = {"temps_left": 0, "killed_before_ready": 0, "rows": 0, "published": 0}
    for kill in range(KILLS):
        log = tmp_path / f"child-{kill}.log"
        proc = spawn("saver_main", disk, ram_file, kill * 10_000, rng.randrange(2**31), log=log)
        children.append(proc)
        if kill % 8 == 3:  # before the cache is up: in the interpreter or the startup scan
            time.sleep(rng.uniform(0.0, 0.3))
        elif kill % 8 == 7:  # anywhere from interpreter start to mid-run
            time.sleep(rng.uniform(0.0, 1.2))
        else:
            assert wait_for_line(log, "ready", proc, 30), f"child {kill} died: {proc.returncode}"
            time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        lines = log.read_text().splitlines()
        stats["killed_before_ready"] += "ready" not in lines
        stats["temps_left"] += bool(list(disk.glob("*.tmp")) + list(ram_file.glob("*.tmp")))
        assert not [line for line in lines if line.startswith("Traceback")]
        published = [line.split() for line in lines if line.startswith("saved ")]
        stats["published"] += len(published)

        fresh = erllama_py.cache.start(crash_settings(disk, ram_file))
        try:
            counters = fresh.counters()
            assert counters.corrupt_files == 0, "a SIGKILL must never leave a corrupt row"
            assert counters.evictions == 0
            keys = verify_tiers(fresh, [disk, ram_file])
            stats["rows"] += len(keys)
            disk_saves = [
                bytes.fromhex(words[2])
                for words in published
                if words[1] == "disk" and words[3] in ("saved", "adopted")
            ]
            if disk_saves:  # published and fsynced before the kill: still there
                assert disk_saves[-1] in keys, "the newest published disk row was lost"
            assert fresh.counters().corrupt_files == 0
            assert fresh.check() == []
        finally:
            fresh.stop()
    # The kills really landed everywhere: before the cache was up, and in the middle of writes.
    assert stats["killed_before_ready"] > 0
    assert stats["temps_left"] > 0
    assert stats["published"] > KILLS
    print(f"\n[crash] {KILLS} SIGKILLs: {stats}")


# --------------------------------------------------------------------------- bit flips


def _build_corpus(root: Path) -> dict[str, list[int]]:
    """A stopped cache's files: ``<tier dir>/<file name>`` -> tokens."""
    rng = random.Random(7)
    cache = erllama_py.cache.start(crash_settings(root / "disk", root / "ramfile"))
    names: dict[str, list[int]] = {}
    try:
        for row_id in range(16):
            tokens = row_tokens(row_id, rng)
            tokens[1] = rng.choice([0, 1, 100, 5 * KB, 200 * KB, MB])
            tier = "ram_file" if row_id % 3 == 0 else "disk"
            key = cache.save(NS, tokens, expected_payload(tokens), tier=tier)
            names[f"{tier.replace('_', '')}/{key_hex(key)}.kvc"] = tokens
    finally:
        cache.stop()
    return names


def _damage(path: Path, rng: random.Random) -> str:
    """Flip bits in one region (never in the hit count), truncate or extend a file.

    Returns what it did.
    """
    data = bytearray(path.read_bytes())
    payload_offset = kvc.read_prefix_file(path).payload_offset
    regions = {
        "header": range(kvc.HEADER_SIZE),
        "tokens+meta": range(kvc.HEADER_SIZE, payload_offset),
        "payload": range(payload_offset, len(data)),
    }
    what = rng.choice([*regions, "truncate", "extend"])
    if what == "truncate":
        del data[rng.randrange(len(data)) :]
    elif what == "extend":
        data += os.urandom(rng.randint(1, 64))
    else:
        region = regions[what] or regions["header"]
        flips: set[tuple[int, int]] = set()  # distinct bits, so that no flip undoes another
        count = rng.randint(1, 3)
        while len(flips) < count:
            offset = rng.choice(region)
            if not kvc.HIT_COUNT_OFFSET <= offset < kvc.HIT_COUNT_OFFSET + 4:
                flips.add((offset, rng.randrange(8)))
        for offset, bit in flips:
            data[offset] ^= 1 << bit
        what = f"{what} flips at {sorted(flips)}"
    path.write_bytes(bytes(data))
    return what


@pytest.mark.parametrize("verify_on_scan", [False, True], ids=["verify-at-load", "verify-at-scan"])
def test_bit_flips_and_truncations_are_detected_counted_deleted_and_never_served(
    tmp_path: Path, verify_on_scan: bool, wait_until: Any
) -> None:
    pristine = tmp_path / "pristine"
    corpus = _build_corpus(pristine)
    caught = {"scan": 0, "load": 0}
    for trial in range(4):
        rng = random.Random(trial * 31 + verify_on_scan)
        root = tmp_path / f"trial-{trial}"
        shutil.copytree(pristine, root)
        damaged = {
            name: _damage(root / name, rng)
            for name in rng.sample(sorted(corpus), k=rng.randint(4, 10))
        }
        cache = erllama_py.cache.start(
            crash_settings(root / "disk", root / "ramfile", verify_on_scan=verify_on_scan)
        )
        try:
            at_scan = cache.counters().corrupt_files
            for info in cache.rows():
                name = f"{info.kind.replace('_', '')}/{info.key_hex}.kvc"
                loaded = cache.fetch(info.key)
                if name in damaged:
                    assert loaded is None, f"{name} ({damaged[name]}) was served"
                else:
                    assert loaded == expected_payload(corpus[name])
            # Every damaged file was caught (at scan or at load), counted and deleted.
            expected = len(damaged)
            wait_until(
                lambda cache=cache, n=expected: cache.counters().corrupt_files >= n,
                f"every damaged file to be counted: {damaged}",
            )
            assert cache.counters().corrupt_files == len(damaged), damaged
            caught["scan"] += at_scan
            caught["load"] += len(damaged) - at_scan
            for name in corpus:
                assert (root / name).exists() == (name not in damaged), name
            assert len(cache.rows()) == len(corpus) - len(damaged)
            assert cache.check() == []
        finally:
            cache.stop()
    # Headers, sizes and prefixes are caught by the scan; payloads at load unless verified.
    assert caught["scan"] > 0
    assert (caught["load"] == 0) if verify_on_scan else (caught["load"] > 0)


# --------------------------------------------------------------------------- racing writers


def _assert_one_whole_winner(disk: Path, round_no: int, outcomes: list[tuple[str, str]]) -> None:
    """Exactly one valid file for the round's key, holding one racer's whole payload."""
    tokens, _ = race_row(round_no, 0)
    key = make_key(NS, tokens)
    names = [p.name for p in disk.iterdir() if p.name.startswith(key_hex(key))]
    assert names == [f"{key_hex(key)}.kvc"], names
    _, published = kvc.read_file(disk / names[0], expected_key=key)
    candidates = [race_row(round_no, racer)[1] for racer in (0, 1)]
    assert bytes(published) in candidates, "a mixed or foreign payload was published"
    winner = candidates.index(bytes(published))
    statuses = [status for status, _ in outcomes]
    assert statuses[winner] == "saved"
    assert statuses[1 - winner] in ("adopted", "already_present")
    digest = xxhash.xxh3_64_hexdigest(published)
    assert [d for _, d in outcomes] == [digest, digest], "a racer loaded something else"


def test_two_caches_of_one_process_racing_on_a_key_publish_one_file_and_the_loser_adopts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "disk"
    settings = CacheSettings(tiers=(TierSettings("disk", 256 * MB, disk),), writers=2)
    # Past the root lock (tests/runtime/test_guards.py tests it), so that the publish
    # protocol itself is what keeps the files whole when two caches share a root.
    monkeypatch.setattr(RootLocks, "acquire", lambda _self, _cache: None)
    caches = [erllama_py.cache.start(settings), erllama_py.cache.start(settings)]
    barrier = threading.Barrier(2)

    def race(racer: int, round_no: int) -> tuple[str, str]:
        tokens, body = race_row(round_no, racer)
        barrier.wait(10)
        result = caches[racer].save_async(NS, tokens, body, tier="disk").result(30)
        loaded = caches[racer].fetch(result.key)
        return result.status, "none" if loaded is None else xxhash.xxh3_64_hexdigest(loaded)

    try:
        with ThreadPoolExecutor(2) as pool:
            for round_no in range(40):
                outcomes = list(pool.map(race, (0, 1), (round_no, round_no)))
                _assert_one_whole_winner(disk, round_no, outcomes)
        assert list(disk.glob("*.tmp")) == []
        for cache in caches:
            assert len(cache.rows()) == 40
            assert cache.check() == []
        assert sum(c.counters().adoptions for c in caches) == 40
    finally:
        for cache in caches:
            cache.stop()


def test_two_processes_racing_on_a_key_publish_one_file_and_the_loser_adopts(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    disk = tmp_path / "disk"
    racers = [spawn("racer_main", disk, racer) for racer in (0, 1)]
    children.extend(racers)
    replies = [_lines(proc) for proc in racers]
    for reply in replies:
        assert reply.get(timeout=30) == "ready"
    for round_no in range(15):
        for proc in racers:  # both go at once: the key is saved by two processes
            assert proc.stdin is not None
            proc.stdin.write(f"{round_no}\n")
            proc.stdin.flush()
        outcomes: list[tuple[str, str]] = []
        for reply in replies:
            got_round, status, digest = reply.get(timeout=30).split()
            assert int(got_round) == round_no
            outcomes.append((status, digest))
        _assert_one_whole_winner(disk, round_no, outcomes)
    for proc in racers:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(30) == 0
    assert list(disk.glob("*.tmp")) == []
    fresh = erllama_py.cache.start(
        CacheSettings(tiers=(TierSettings("disk", 256 * MB, disk),), writers=1)
    )
    try:
        assert len(fresh.rows()) == 15 and fresh.counters().corrupt_files == 0
        for info in fresh.rows():
            tokens = decode_tokens(kvc.read_prefix_file(info.path).token_bytes)  # type: ignore[arg-type]
            assert fresh.fetch(info.key) in [race_row(tokens[0], racer)[1] for racer in (0, 1)]
        assert fresh.check() == []
    finally:
        fresh.stop()


def test_a_file_that_fails_validation_at_load_is_never_returned_even_if_the_index_trusts_it(
    tmp_path: Path, wait_until: Any
) -> None:
    # Swapping a valid file for another valid row's file (a foreign payload under this name)
    # is caught by the key check at load, not served.
    disk, ram_file = tmp_path / "disk", tmp_path / "ramfile"
    cache = erllama_py.cache.start(crash_settings(disk, ram_file))
    try:
        a = cache.save(NS, [1, 100], expected_payload([1, 100]), tier="disk")
        b = cache.save(NS, [2, 100], expected_payload([2, 100]), tier="disk")
        shutil.copyfile(disk / f"{key_hex(b)}.kvc", disk / f"{key_hex(a)}.kvc")
        with pytest.raises(CacheFormatError):
            kvc.read_file(disk / f"{key_hex(a)}.kvc", expected_key=a)
        assert cache.fetch(a) is None
        assert cache.fetch(b) == expected_payload([2, 100])
        wait_until(lambda: cache.lookup_key(a) is None, "the foreign row to leave the index")
        assert cache.counters().corrupt_files == 1
        assert cache.check() == []
    finally:
        cache.stop()
