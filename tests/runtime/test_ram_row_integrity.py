"""A RAM row whose bytes change after publication is never restored into a model.

The runtime's counterpart of the damaged-file test in `test_faults.py`: a model saving
to the RAM tier keeps its packed states there by reference (slots of the runtime's
shared-memory arena, which the worker that packed them maps writable too), so a write
through any mapping of one changes the row. The next request that would restore it
finds the checksum wrong, drops the row, counts it, and runs cold.
"""

from __future__ import annotations

from typing import Any

from erllama_py import CacheHit, Runtime
from erllama_py.model.arena import ArenaSlice
from erllama_py.model.statebuf import StateBuffer


def _change_every_ram_row(rt: Runtime) -> int:
    """Flip one bit of every RAM row through a writable mapping of its arena segment of
    our own (as the worker that packed the state has one)."""
    entries = list(rt.cache.shared.ram.entries())
    for entry in entries:
        slot = entry.payload
        assert isinstance(slot, ArenaSlice)
        with StateBuffer.from_fd(slot.segment_fd, writable=True) as mapping:
            view = mapping.view()
            view[slot.offset + entry.size // 2] ^= 0x01
            del view
    return len(entries)


def test_a_ram_row_whose_bytes_change_after_publication_is_never_restored_into_a_model(
    rt: Runtime, load: Any, model_kind: str, assert_cache_sound: Any
) -> None:
    m = load(rt, model_kind, tier="ram")
    prompt = m.tokens("the sun and the moon and the sky")
    first = m.complete(prompt, max_tokens=6)
    rt.cache.wait_idle()
    rows = rt.cache_rows()
    assert {r.reason for r in rows} == {"cold", "finish"}
    assert {r.kind for r in rows} == {"ram"}
    assert _change_every_ram_row(rt) == 2
    before = rt.counters()
    follow = [*prompt, *first.tokens]
    resumed = m.complete(follow, max_tokens=4, parent_key=first.finish_key)
    assert resumed.cache.kind == "cold"
    again = m.complete(prompt, max_tokens=6)
    assert again.cache.kind != "exact"
    counters = rt.counters()
    assert counters.corrupt_files - before.corrupt_files == 2
    assert counters.load_misses - before.load_misses >= 2
    reference = load(rt, model_kind, "ref", reference=True)
    assert resumed.tokens == reference.complete(follow, max_tokens=4).tokens
    if model_kind == "stub":  # the stub's tokens depend on the context only
        assert again.tokens == first.tokens
    assert_cache_sound(rt)  # the changed rows are gone; the new saves are sound
    hit = m.complete(follow, max_tokens=4)
    assert hit.cache == CacheHit("exact", len(follow))
    assert hit.tokens == resumed.tokens
