"""The two checks that guard DESIGN.md's cache invariants 2 and 4 at their last moment.

- Invariant 2 (loading verifies the checksum): a RAM row is kept by reference, so its
  bytes can change after it was published (a buffer its saver still wrote to, a stray
  write through a shared mapping). Such a row is never restored, whatever the way it is
  read (a view, a copy into the caller's buffer, `fetch`, a demotion to a file tier), and
  it is counted in ``corrupt_files``.
- Invariant 4 (a reservation checked just before linking): a writer whose reservation
  expired, or was replaced by another writer's, while it was between writing its temp
  file and ``link(2)`` gives up with `ReservationError` and leaves nothing behind.

A writer is held between its write and its link by wrapping `FileStore.write_temp`; time
is stepped on the index's injected clock, so no test waits for a TTL to pass.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from erllama_py.cache import CacheHandle, Namespace, key_hex
from erllama_py.cache.filestore import FileStore
from erllama_py.cache.meta_client import _Forward
from erllama_py.errors import ReservationError
from erllama_py.model.statebuf import StateBuffer

KB = 1024
WAIT_S = 10.0  # the bound on every wait below; reaching it means failure


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def files_in(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --------------------------------------------------------------------------- RAM rows


def _bytearray(data: bytes) -> tuple[Any, memoryview]:
    buffer = bytearray(data)
    return buffer, memoryview(buffer)


def _state_buffer(data: bytes) -> tuple[Any, memoryview]:
    buffer = StateBuffer.create(len(data))
    buffer.view()[:] = data
    return buffer, buffer.view()


# A RAM row keeps the saver's buffer when it hands it over (owns_payload): the model's
# shared-memory state buffers, or any writable buffer of a caller of the cache API.
HANDED_OVER: dict[str, Callable[[bytes], tuple[Any, memoryview]]] = {
    "bytearray": _bytearray,
    "shared-memory": _state_buffer,
}


def _read_view(cache: CacheHandle, key: bytes) -> bytes | None:
    claim = cache.claim(key)
    assert claim is not None
    try:
        view = cache.load(claim)
        return None if view is None else bytes(view)
    finally:
        cache.checkin(claim)


def _read_into_buffer(cache: CacheHandle, key: bytes) -> bytes | None:
    claim = cache.claim(key)
    assert claim is not None
    try:
        view = cache.load(claim, bytearray)
        return None if view is None else bytes(view)
    finally:
        cache.checkin(claim)


READS: dict[str, Callable[[CacheHandle, bytes], bytes | None]] = {
    "view": _read_view,
    "into-a-buffer": _read_into_buffer,
    "fetch": lambda cache, key: cache.fetch(key),
}


@pytest.mark.parametrize("read", sorted(READS))
@pytest.mark.parametrize("kind", sorted(HANDED_OVER))
def test_a_ram_row_whose_bytes_change_after_publication_is_never_restored(
    cache: CacheHandle, ns: Namespace, wait_until: Any, kind: str, read: str
) -> None:
    body = payload(64 * KB, 1)
    buffer, writable = HANDED_OVER[kind](body)
    key = cache.save(ns, [3, 1, 4], buffer, tier="ram", owns_payload=True)
    assert READS[read](cache, key) == body  # sound while its bytes are the saved ones
    writable[len(body) // 2] ^= 0x01  # one bit, after publication
    del writable
    assert READS[read](cache, key) is None
    wait_until(lambda: cache.lookup_key(key) is None, "the changed row to leave the index")
    counters = cache.counters()
    assert counters.corrupt_files == 1
    assert counters.load_misses == 1
    assert cache.claim(key) is None
    assert cache.fetch(key) is None
    assert cache.check() == []


def test_a_ram_row_whose_bytes_changed_is_not_demoted_to_a_file_tier(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path], wait_until: Any
) -> None:
    # A demotion writes the RAM bytes into a file with a checksum of its own: computed
    # over changed bytes, that file would pass every later check.
    body = payload(32 * KB, 2)
    buffer = bytearray(body)
    key = cache.save(ns, [2, 7, 1], buffer, tier="ram", owns_payload=True)
    buffer[7] ^= 0x80
    assert cache.evict_bytes(1, ["ram"]) == (1, len(body))
    cache.wait_idle(WAIT_S)
    assert cache.fetch(key) is None
    assert cache.lookup_key(key) is None
    assert files_in(roots["ram_file"]) == [] and files_in(roots["disk"]) == []
    counters = cache.counters()
    assert counters.corrupt_files == 1
    assert counters.demotions == 0
    assert cache.check() == []


def test_a_sound_ram_row_is_still_demoted_and_restored_exactly(
    cache: CacheHandle, ns: Namespace, roots: dict[str, Path]
) -> None:
    body = payload(32 * KB, 3)
    key = cache.save(ns, [1, 6, 1], bytearray(body), tier="ram", owns_payload=True)
    assert cache.evict_bytes(1, ["ram"]) == (1, len(body))
    cache.wait_idle(WAIT_S)
    assert cache.lookup_key(key).kind == "ram_file"  # type: ignore[union-attr]
    assert cache.fetch(key) == body
    assert files_in(roots["ram_file"]) == [f"{key_hex(key)}.kvc"]
    assert cache.counters().corrupt_files == 0
    assert cache.check() == []


# --------------------------------------------------------------------------- reservations


@dataclass
class HeldWriter:
    """A writer stopped after its temp file is written and synced, before it links it."""

    written: threading.Event
    release: threading.Event
    temp: list[Path]


@pytest.fixture
def held_writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldWriter]:
    """Hold the first file save of the test between `write_temp` and the link."""
    held = HeldWriter(threading.Event(), threading.Event(), [])
    real_write = FileStore.write_temp

    def write_then_wait(store: FileStore, path: Path, prefix: bytes, body: Any) -> int:
        size = real_write(store, path, prefix, body)
        if not held.written.is_set():
            held.temp.append(path)
            held.written.set()
            assert held.release.wait(WAIT_S), "the test never released the writer"
        return size

    monkeypatch.setattr(FileStore, "write_temp", write_then_wait)
    try:
        yield held
    finally:
        held.release.set()


def _expire_every_reservation(cache: CacheHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step the index's clock past every reservation's TTL, then sweep."""
    index = cache.shared.index()
    later = time.monotonic() + 10 * cache.shared.settings.reservation_ttl_s
    monkeypatch.setattr(index, "_clock", lambda: later + time.monotonic())
    cache.sweep()


def test_a_writer_whose_reservation_expires_between_write_and_link_gives_up_leaving_nothing(
    make_cache: Any,
    ns: Namespace,
    roots: dict[str, Path],
    held_writer: HeldWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = make_cache(writers=1)
    ticket = cache.save_async(ns, [5, 3, 5], payload(16 * KB, 4), tier="disk")
    assert held_writer.written.wait(WAIT_S)
    assert files_in(roots["disk"]) == [held_writer.temp[0].name]
    _expire_every_reservation(cache, monkeypatch)
    assert [r for r in cache.rows() if r.key == ticket.key] == []
    held_writer.release.set()
    with pytest.raises(ReservationError) as caught:
        ticket.result(WAIT_S)
    assert caught.value.reason == "expired"
    assert files_in(roots["disk"]) == []
    assert cache.lookup_key(ticket.key) is None
    assert cache.fetch(ticket.key) is None
    counters = cache.counters()
    assert counters.saves_dropped == 1
    assert counters.saves_finish == 0 and counters.adoptions == 0
    assert counters.bytes_disk == 0
    assert cache.check() == []


def test_a_writer_whose_reservation_is_replaced_between_write_and_link_gives_up_leaving_nothing(
    make_cache: Any,
    ns: Namespace,
    roots: dict[str, Path],
    held_writer: HeldWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = make_cache(writers=2)
    first = cache.save_async(ns, [2, 6, 5], b"the held writer's bytes", tier="disk")
    assert held_writer.written.wait(WAIT_S)
    _expire_every_reservation(cache, monkeypatch)
    # Another writer reserves the same key (a new token) and publishes it.
    second = cache.save_async(ns, [2, 6, 5], b"the second writer's bytes", tier="disk")
    assert second.result(WAIT_S).status == "saved"
    held_writer.release.set()
    with pytest.raises(ReservationError) as caught:
        first.result(WAIT_S)
    assert caught.value.reason == "expired"
    assert files_in(roots["disk"]) == [f"{key_hex(first.key)}.kvc"]
    assert cache.fetch(first.key) == b"the second writer's bytes"
    counters = cache.counters()
    assert counters.saves_finish == 1 and counters.saves_dropped == 1
    assert counters.adoptions == 0 and counters.duplicate_dropped == 0
    assert cache.check() == []


def test_a_writer_gives_up_even_while_the_expiry_of_its_reservation_is_still_cleaning_up(
    make_cache: Any,
    ns: Namespace,
    roots: dict[str, Path],
    held_writer: HeldWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The expiry forgets the reservation, then removes its temp file: a writer that linked
    # in between would publish a row nobody reserved. The meta actor is held inside that
    # removal while the writer goes on; whatever the writer does next (ask the meta actor,
    # or link) releases the removal.
    cache = make_cache(writers=1)
    removing, removal_gate = threading.Event(), threading.Event()
    moved: list[str] = []
    writer_moved = threading.Event()
    real_unlink, real_link, real_getattr = Path.unlink, FileStore.link, _Forward.__getattr__

    def held_unlink(path: Path, missing_ok: bool = False) -> None:
        if held_writer.temp and path == held_writer.temp[0]:
            removing.set()
            assert removal_gate.wait(WAIT_S), "the test never released the removal"
        real_unlink(path, missing_ok=missing_ok)

    def noted_getattr(forward: _Forward, name: str) -> Callable[..., object]:
        # The writer holds its forwarder from start-up: note the call where it is looked up.
        if name == "check_reservation":
            moved.append(name)
            writer_moved.set()
        return real_getattr(forward, name)

    def noted_link(store: FileStore, temp: Path, key: bytes) -> tuple[Path, int, bool]:
        linked = real_link(store, temp, key)
        moved.append("link")
        writer_moved.set()
        return linked

    monkeypatch.setattr(Path, "unlink", held_unlink)
    monkeypatch.setattr(_Forward, "__getattr__", noted_getattr)
    monkeypatch.setattr(FileStore, "link", noted_link)
    ticket = cache.save_async(ns, [9, 7, 9], payload(16 * KB, 5), tier="disk")
    assert held_writer.written.wait(WAIT_S)
    index = cache.shared.index()
    later = time.monotonic() + 10 * cache.shared.settings.reservation_ttl_s
    monkeypatch.setattr(index, "_clock", lambda: later + time.monotonic())
    with ThreadPoolExecutor(1) as pool:
        sweep = pool.submit(cache.sweep)
        assert removing.wait(WAIT_S), "the expiry never removed the temp file"
        held_writer.release.set()
        assert writer_moved.wait(WAIT_S)
        removal_gate.set()
        sweep.result(WAIT_S)
    with pytest.raises(ReservationError) as caught:
        ticket.result(WAIT_S)
    assert caught.value.reason == "expired", moved
    assert files_in(roots["disk"]) == [], moved
    assert cache.lookup_key(ticket.key) is None
    assert cache.counters().adoptions == 0
    assert cache.check() == []
