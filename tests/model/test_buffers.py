"""The worker's mapping cache and the runtime's pool of restore buffers."""

from __future__ import annotations

import os

from erllama_py.model.bufpool import MIB, BufferPool
from erllama_py.model.mapcache import MappingCache
from erllama_py.model.statebuf import StateBuffer


def test_a_memfd_sent_again_reuses_its_mapping_and_sees_current_bytes() -> None:
    cache = MappingCache()
    source = StateBuffer.create(4096)
    try:
        first = cache.open(os.dup(source.fd), 4096)
        again = cache.open(os.dup(source.fd), 4096)
        assert again is first
        assert cache.owns(first)
        source.view()[:3] = b"abc"
        assert bytes(again.view()[:3]) == b"abc"
    finally:
        cache.clear()
        source.close()


def test_the_mapping_cache_is_bounded_and_closes_what_it_drops() -> None:
    cache = MappingCache(max_bytes=3 * 4096, max_entries=8)
    sources = [StateBuffer.create(4096) for _ in range(5)]
    try:
        opened = [cache.open(os.dup(s.fd), 4096) for s in sources]
        assert sum(cache.owns(b) for b in opened) == 3
        assert all(b.closed for b in opened[:2])
    finally:
        cache.clear()
        for s in sources:
            s.close()
    assert all(b.closed for b in opened)


def test_a_released_buffer_serves_the_next_request_of_a_similar_size() -> None:
    pool = BufferPool()
    buffer = pool.acquire(3 * MIB + 5)
    assert buffer.size == 4 * MIB
    pool.release(buffer)
    assert pool.acquire(3 * MIB) is buffer
    pool.release(buffer)
    other = pool.acquire(MIB)  # far smaller: a new buffer, the big one is kept
    assert other is not buffer
    assert len(pool) == 1
    pool.release(other)
    pool.clear()
    assert buffer.closed
    assert other.closed


def test_the_pool_keeps_only_what_its_bounds_allow() -> None:
    pool = BufferPool(max_bytes=2 * MIB, max_buffers=4)
    buffers = [pool.acquire(MIB) for _ in range(3)]
    for b in buffers:
        pool.release(b)
    assert len(pool) == 2
    assert buffers[2].closed
    pool.clear()
