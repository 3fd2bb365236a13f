"""The model actor's pool of free sequence ids hands out the lowest first."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from erllama_py.model.seqpool import SeqPool


@given(st.integers(1, 16), st.lists(st.tuples(st.booleans(), st.integers(0, 15)), max_size=60))
def test_take_is_always_the_lowest_free_id(n: int, moves: list[tuple[bool, int]]) -> None:
    pool = SeqPool(n)
    in_use: set[int] = set()
    for take, pick in moves:
        if take and pool:
            seq = pool.take()
            assert seq == min(set(range(n)) - in_use)
            in_use.add(seq)
        elif in_use:
            seq = sorted(in_use)[pick % len(in_use)]
            in_use.discard(seq)
            pool.give(seq)
            pool.give(seq)  # a second give changes nothing
        assert len(pool) == n - len(in_use)
        assert all((s in pool) != (s in in_use) for s in range(n))


def test_sequences_freed_out_of_order_are_reused_from_the_bottom() -> None:
    pool = SeqPool(4)
    assert [pool.take() for _ in range(4)] == [0, 1, 2, 3]
    for seq in (3, 0, 2):
        pool.give(seq)
    assert [pool.take(), pool.take(), pool.take()] == [0, 2, 3]
    assert not pool
