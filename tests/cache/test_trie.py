"""The token radix tree, against a brute-force model, plus edge cases and a timing."""

from __future__ import annotations

import random
import statistics
import time

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from erllama_py.cache.key import encode_tokens
from erllama_py.cache.trie import Candidate, PrefixMatch, RowRef, TokenTrie


def _key(tokens: list[int] | tuple[int, ...]) -> bytes:
    return xxhash.xxh3_128_digest(b"test" + encode_tokens(list(tokens)))


def _enc(tokens: list[int] | tuple[int, ...]) -> bytes:
    return encode_tokens(list(tokens))


def _trie(*rows: list[int]) -> TokenTrie:
    trie = TokenTrie()
    for tokens in rows:
        assert trie.insert(_enc(tokens), _key(tokens))
    return trie


def _ref(tokens: list[int]) -> RowRef:
    return RowRef(_key(tokens), len(tokens))


# ---------------------------------------------------------------- the model


def _lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _brute_longest(
    rows: dict[bytes, tuple[int, ...]], prompt: tuple[int, ...]
) -> PrefixMatch | None:
    covered = None
    prefixes = [(len(t), k) for k, t in rows.items() if prompt[: len(t)] == t]
    if prefixes:
        length, key = max(prefixes)
        covered = RowRef(key, length)
    best = max((_lcp(t, prompt) for t in rows.values()), default=0)
    common = None
    if best > 0:
        length, key = min((len(t), k) for k, t in rows.items() if _lcp(t, prompt) == best)
        common = RowRef(key, length)
    if covered is None and common is None:
        return None
    return PrefixMatch(covered, common, best)


def _brute_candidates(
    rows: dict[bytes, tuple[int, ...]], prompt: tuple[int, ...], limit: int, min_tokens: int
) -> list[Candidate]:
    found = [Candidate(k, len(t), _lcp(t, prompt)) for k, t in rows.items()]
    found = [c for c in found if c.usable >= min_tokens]
    found.sort(key=lambda c: (-c.usable, c.n_tokens, c.key))
    return found[:limit]


_small_lists = st.lists(st.integers(0, 2), max_size=8).map(tuple)


class TokenTrieMachine(RuleBasedStateMachine):
    """Random inserts, removes and lookups over a 3-token alphabet, so prefixes collide."""

    def __init__(self) -> None:
        super().__init__()
        self.trie = TokenTrie()
        self.rows: dict[bytes, tuple[int, ...]] = {}

    @rule(tokens=_small_lists)
    def insert(self, tokens: tuple[int, ...]) -> None:
        key = _key(tokens)
        assert self.trie.insert(_enc(tokens), key) == (key not in self.rows)
        self.rows[key] = tokens

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def remove_stored(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.rows)))
        assert self.trie.remove(_enc(self.rows[key]), key)
        del self.rows[key]

    @rule(tokens=_small_lists)
    def remove_any(self, tokens: tuple[int, ...]) -> None:
        key = _key(tokens)
        assert self.trie.remove(_enc(tokens), key) == (key in self.rows)
        self.rows.pop(key, None)

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def remove_by_key(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.rows)))
        assert self.trie.remove_key(key)
        assert not self.trie.remove_key(key)
        del self.rows[key]

    @precondition(lambda self: self.rows)
    @rule(data=st.data(), other=_small_lists)
    def insert_conflicting(self, data: st.DataObject, other: tuple[int, ...]) -> None:
        key = data.draw(st.sampled_from(sorted(self.rows)))
        tokens = self.rows[key]
        with pytest.raises(ValueError, match="already stored under key"):
            self.trie.insert(_enc(tokens), b"not a stored key")
        if other != tokens:
            with pytest.raises(ValueError, match="already stored with other tokens"):
                self.trie.insert(_enc(other), key)

    @rule(prompt=st.lists(st.integers(0, 2), max_size=10).map(tuple))
    def longest_prefix(self, prompt: tuple[int, ...]) -> None:
        assert self.trie.longest_prefix(_enc(prompt)) == _brute_longest(self.rows, prompt)

    @rule(
        prompt=st.lists(st.integers(0, 2), max_size=10).map(tuple),
        limit=st.integers(0, 6),
        min_tokens=st.integers(0, 3),
    )
    def candidates(self, prompt: tuple[int, ...], limit: int, min_tokens: int) -> None:
        got = self.trie.candidates(_enc(prompt), limit, min_tokens)
        assert got == _brute_candidates(self.rows, prompt, limit, min_tokens)

    @invariant()
    def tree_is_sound(self) -> None:
        assert self.trie.check() == []

    @invariant()
    def rows_match_the_model(self) -> None:
        assert len(self.trie) == len(self.rows)
        assert set(self.trie.keys()) == set(self.rows)
        for key, tokens in self.rows.items():
            assert key in self.trie
            assert self.trie.tokens_of(key) == _enc(tokens)
            assert self.trie.find(_enc(tokens)) == key


TestTokenTrieMachine = TokenTrieMachine.TestCase
TestTokenTrieMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@settings(max_examples=200)
@given(
    st.lists(st.lists(st.integers(0, 3), max_size=12).map(tuple), max_size=25, unique=True),
    st.lists(st.integers(0, 3), max_size=14).map(tuple),
)
def test_longest_prefix_equals_brute_force(
    rows: list[tuple[int, ...]], prompt: tuple[int, ...]
) -> None:
    trie = TokenTrie()
    model = {}
    for tokens in rows:
        trie.insert(_enc(tokens), _key(tokens))
        model[_key(tokens)] = tokens
    assert trie.longest_prefix(_enc(prompt)) == _brute_longest(model, prompt)
    assert trie.candidates(_enc(prompt), 100, 0) == _brute_candidates(model, prompt, 100, 0)


# ---------------------------------------------------------------- edge cases


def test_an_empty_trie_matches_nothing() -> None:
    trie = TokenTrie()
    assert trie.longest_prefix(_enc([1, 2])) is None
    assert trie.longest_prefix(b"") is None
    assert trie.candidates(_enc([1]), 5) == []
    assert len(trie) == 0


def test_an_empty_prompt_is_covered_only_by_the_empty_row() -> None:
    trie = _trie([1, 2], [3])
    assert trie.longest_prefix(b"") is None
    trie.insert(b"", _key([]))
    assert trie.longest_prefix(b"") == PrefixMatch(_ref([]), None, 0)


def test_the_empty_row_covers_every_prompt() -> None:
    trie = _trie([], [5, 6])
    assert trie.longest_prefix(_enc([9])) == PrefixMatch(_ref([]), None, 0)
    assert trie.longest_prefix(_enc([5, 7])) == PrefixMatch(_ref([]), _ref([5, 6]), 1)
    assert trie.remove(b"", _key([]))
    assert trie.check() == []
    assert trie.longest_prefix(_enc([9])) is None


def test_a_prompt_shorter_than_every_row_gets_the_shortest_row_to_cut() -> None:
    trie = _trie([1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 6, 7])
    assert trie.longest_prefix(_enc([1, 2])) == PrefixMatch(None, _ref([1, 2, 3, 9]), 2)


def test_covered_and_common_together() -> None:
    trie = _trie([1, 2], [1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7])
    match = trie.longest_prefix(_enc([1, 2, 3, 4, 8]))
    assert match == PrefixMatch(_ref([1, 2]), _ref([1, 2, 3, 4, 5]), 4)


def test_an_exact_row_is_both_covered_and_common() -> None:
    trie = _trie([1, 2, 3], [1, 2, 3, 4])
    assert trie.longest_prefix(_enc([1, 2, 3])) == PrefixMatch(_ref([1, 2, 3]), _ref([1, 2, 3]), 3)


def test_ties_between_equally_short_rows_go_to_the_smaller_key() -> None:
    trie = _trie([1, 2, 3], [1, 2, 4])
    expected = min(_ref([1, 2, 3]), _ref([1, 2, 4]))
    assert trie.longest_prefix(_enc([1, 2, 5])) == PrefixMatch(None, expected, 2)


def test_identical_token_lists_are_stored_once() -> None:
    trie = _trie([1, 2, 3])
    assert not trie.insert(_enc([1, 2, 3]), _key([1, 2, 3]))
    with pytest.raises(ValueError, match="already stored under key"):
        trie.insert(_enc([1, 2, 3]), b"another key 16 b")
    with pytest.raises(ValueError, match="already stored with other tokens"):
        trie.insert(_enc([1, 2]), _key([1, 2, 3]))
    assert len(trie) == 1
    assert trie.check() == []
    assert trie.node_count() == 2


def test_removal_merges_nodes_back() -> None:
    trie = _trie([1, 2, 3, 4])
    alone = trie.node_count()
    trie.insert(_enc([1, 2, 3, 5]), _key([1, 2, 3, 5]))
    trie.insert(_enc([1, 2]), _key([1, 2]))
    assert trie.node_count() == alone + 3  # the split at [1, 2, 3], the leaf [5], and [1, 2]
    assert trie.remove(_enc([1, 2, 3, 5]), _key([1, 2, 3, 5]))
    assert trie.remove(_enc([1, 2]), _key([1, 2]))
    assert trie.node_count() == alone
    assert trie.check() == []
    assert trie.longest_prefix(_enc([1, 2, 3, 4, 9])) == PrefixMatch(
        _ref([1, 2, 3, 4]), _ref([1, 2, 3, 4]), 4
    )


def test_remove_is_idempotent_and_checks_the_tokens() -> None:
    trie = _trie([1, 2, 3])
    assert not trie.remove(_enc([1, 2]), _key([1, 2, 3]))
    assert trie.remove(_enc([1, 2, 3]), _key([1, 2, 3]))
    assert not trie.remove(_enc([1, 2, 3]), _key([1, 2, 3]))
    assert len(trie) == 0
    assert trie.node_count() == 1


def test_clear_empties_the_trie() -> None:
    trie = _trie([1], [1, 2])
    trie.clear()
    assert len(trie) == 0
    assert trie.longest_prefix(_enc([1, 2])) is None


def test_token_bytes_must_be_whole_tokens() -> None:
    trie = TokenTrie()
    with pytest.raises(ValueError, match="multiple of 4"):
        trie.insert(b"\x00" * 5, b"k" * 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        trie.longest_prefix(b"\x00\x00")
    with pytest.raises(ValueError, match="limit"):
        trie.candidates(b"", -1)


def test_candidates_rank_by_usable_tokens_then_length() -> None:
    trie = _trie([1], [1, 2, 3, 9, 9], [1, 2, 3, 8], [1, 2, 7], [4])
    got = trie.candidates(_enc([1, 2, 3, 4]), limit=10)
    assert [(c.n_tokens, c.usable) for c in got] == [(4, 3), (5, 3), (3, 2), (1, 1)]
    assert trie.candidates(_enc([1, 2, 3, 4]), limit=2, min_tokens=1) == got[:2]
    assert trie.candidates(_enc([1, 2, 3, 4]), limit=10, min_tokens=3) == got[:2]


@pytest.mark.parametrize("diverge_at", [0, 1, 1023, 1024, 1025, 2047, 4096, 5000, 19_999])
def test_a_mismatch_deep_inside_a_long_edge_is_found_exactly(diverge_at: int) -> None:
    rng = random.Random(diverge_at)
    row = [rng.randrange(2**32) for _ in range(20_000)]
    trie = _trie(row, [*row, 1])
    prompt = list(row)
    prompt[diverge_at] ^= 1 << rng.randrange(32)
    match = trie.longest_prefix(_enc(prompt))
    if diverge_at == 0:
        assert match is None
    else:
        assert match == PrefixMatch(None, _ref(row), diverge_at)
    short = prompt[: diverge_at + 1]
    assert trie.insert(_enc(short), _key(short))
    assert trie.check() == []
    assert trie.longest_prefix(_enc(prompt)).covered == _ref(short)  # type: ignore[union-attr]


# ---------------------------------------------------------------- timing


def _workload(seed: int = 7) -> tuple[TokenTrie, list[bytes]]:
    """100 conversations x 95 saved points behind a shared system prompt, plus 500 random rows."""
    rng = np.random.default_rng(seed)

    def tokens(n: int) -> bytes:
        return rng.integers(0, 50_000, n, dtype=np.uint32).astype("<u4").tobytes()

    system = tokens(1000)
    trie = TokenTrie()
    conversations = []
    for c in range(100):
        conversation = system + tokens(29_000)
        for point in range(1, 96):
            length = 1000 + point * 300
            trie.insert(conversation[: 4 * length], xxhash.xxh3_128_digest(b"%d/%d" % (c, point)))
        conversations.append(conversation)
    for r in range(500):
        trie.insert(tokens(int(rng.integers(1, 30_000))), xxhash.xxh3_128_digest(b"random %d" % r))
    return trie, conversations


def test_lookup_of_a_30k_token_prompt_over_10k_rows_is_timed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    trie, conversations = _workload()
    assert len(trie) == 10_000
    extended = conversations[3][: 4 * 29_500] + _enc([60_000] * 500)  # a turn after the last save
    diverging = conversations[5][: 4 * 12_345] + _enc([60_000] * 17_655)  # leaves an edge midway
    unrelated = _enc([60_000 + i for i in range(30_000)])
    prompts = {"extends": extended, "diverges": diverging, "unrelated": unrelated}
    timings = {}
    for name, prompt in prompts.items():
        runs = []
        for _ in range(50):
            start = time.perf_counter()
            match = trie.longest_prefix(prompt)
            runs.append(time.perf_counter() - start)
        timings[name] = statistics.median(runs) * 1e6
        assert name == "unrelated" or match is not None
    assert trie.longest_prefix(extended).covered.n_tokens == 29_500  # type: ignore[union-attr]
    assert trie.longest_prefix(diverging).common_len == 12_345  # type: ignore[union-attr]
    with capsys.disabled():
        shown = ", ".join(f"{name} {us:.0f} us" for name, us in timings.items())
        print(f"\n[trie] longest_prefix, 30k-token prompt, 10k rows (median): {shown}")
