"""The arena behind packed states and RAM rows: slots of a few memfd segments.

The free list never hands out overlapping blocks and merges what is freed; slots read
back what was written, free their pages, and are reused; the segments (two descriptors
each) stay few however many slots come and go; a full arena is a typed `OSError`.
"""

from __future__ import annotations

import errno
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erllama_py.model.arena import (
    DEFAULT_MAX_SEGMENTS,
    PAGE,
    Arena,
    ArenaFullError,
    FreeList,
    segments_for,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 8)), max_size=60))
def test_the_free_list_hands_out_disjoint_blocks_and_merges_all_it_gets_back(
    ops: list[tuple[bool, int]],
) -> None:
    capacity = 32 * PAGE
    fl = FreeList(capacity)
    held: list[tuple[int, int]] = []
    for allocate, pages in ops:
        if allocate or not held:
            offset = fl.allocate(pages * PAGE)
            if offset is None:
                assert all(length < pages * PAGE for _, length in fl.blocks())
                continue
            held.append((offset, pages * PAGE))
        else:
            fl.free(*held.pop(len(held) // 2))
        spans = sorted(held + fl.blocks())
        # Held and free blocks tile [0, capacity) exactly: no overlap, no gap.
        assert sum(length for _, length in spans) == capacity
        assert all(a + la == b for (a, la), (b, _) in itertools.pairwise(spans))
        assert fl.free_bytes == capacity - sum(length for _, length in held)
    for block in held:
        fl.free(*block)
    assert fl.blocks() == [(0, capacity)]


def test_a_block_freed_twice_is_refused() -> None:
    fl = FreeList(4 * PAGE)
    offset = fl.allocate(PAGE)
    assert offset is not None
    fl.free(offset, PAGE)
    with pytest.raises(ValueError, match="already free"):
        fl.free(offset, PAGE)


def _memfds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        except OSError:
            continue
    return count


def test_thousands_of_slots_share_one_segment_and_give_their_pages_back() -> None:
    before = _memfds()
    arena = Arena(segment_bytes=64 * 1024 * 1024)
    try:
        slots = [arena.allocate(5000 + i) for i in range(3000)]
        for i, slot in enumerate(slots):
            view = slot.view()
            view[:4] = i.to_bytes(4, "little")
            del view
        assert arena.segments == 1 and _memfds() - before == 2  # memfd and mmap's dup
        assert arena.live_slots == 3000 and arena.live_bytes == 3000 * 2 * PAGE
        assert all(int.from_bytes(s.view()[:4], "little") == i for i, s in enumerate(slots))
        first = slots[0]
        first.close()
        first.close()  # idempotent
        again = arena.allocate(100)
        assert (again.segment_id, again.offset) == (first.segment_id, first.offset)
        assert bytes(again.view()[:4]) == b"\0\0\0\0"  # the freed pages were removed
        for slot in slots[1:]:
            slot.close()
        again.close()
        assert arena.live_slots == 0 and arena.live_bytes == 0
    finally:
        arena.close()
    assert _memfds() == before


def test_a_slot_larger_than_a_segment_gets_a_segment_of_its_own() -> None:
    arena = Arena(segment_bytes=16 * PAGE)
    try:
        small = arena.allocate(PAGE)
        big = arena.allocate(40 * PAGE)
        assert big.segment_id != small.segment_id and arena.segments == 2
        assert big.view().nbytes == 40 * PAGE
    finally:
        arena.close()


def test_a_full_arena_raises_a_typed_os_error() -> None:
    arena = Arena(segment_bytes=4 * PAGE, max_segments=1)
    try:
        arena.allocate(4 * PAGE)
        with pytest.raises(ArenaFullError) as ei:
            arena.allocate(1)
        assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOMEM
    finally:
        arena.close()
    with pytest.raises(ValueError, match="closed"):
        arena.allocate(1)


@pytest.mark.parametrize("row_pages", [1, 9, 15, 16])
def test_an_arena_sized_for_a_ram_quota_holds_a_full_tier_of_rows(row_pages: int) -> None:
    # 9-page rows in 16-page segments: each segment holds one, wasting almost half of it
    # (the worst case of fragmentation), yet the whole quota fits beside a few packs.
    segment = 16 * PAGE
    quota = 40 * segment  # more than DEFAULT_MAX_SEGMENTS segments' worth
    arena = Arena(segment_bytes=segment, max_segments=segments_for(quota, segment))
    try:
        rows = [arena.allocate(row_pages * PAGE) for _ in range(quota // (row_pages * PAGE))]
        packs = [arena.allocate(row_pages * PAGE) for _ in range(2)]  # saves in flight
        assert arena.live_bytes == (len(rows) + len(packs)) * row_pages * PAGE
    finally:
        arena.close()


def test_the_segment_cap_grows_with_the_ram_quota_and_keeps_a_floor() -> None:
    gib = 1 << 30
    assert segments_for(0) == segments_for(2 * gib) == DEFAULT_MAX_SEGMENTS
    assert segments_for(64 * gib) == 130
