"""Time TokenTrie against the stride walk on a realistic row population.

Run from the repository root::

    .venv/bin/python -m bench.trie_bench [--conversations 100] [--points 95] [--random 500]

The population: every conversation starts with the same 1,000-token system
prompt and has a row saved every 300 tokens up to 29,500; random rows of
random length (up to 30,000 tokens) are added. The prompts are 30,000 tokens:
one extends a conversation past its last save, one leaves a conversation in
the middle of an edge, one shares nothing. Reports medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from erllama_py.cache.key import Namespace, ctx_params_hash, make_key_encoded, stride_walk
from erllama_py.cache.trie import TokenTrie

NS = Namespace(bytes(32), "q4_k_m", ctx_params_hash(n_ctx=32768))


def _median_us(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--points", type=int, default=95)
    parser.add_argument("--random", type=int, default=500)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(1)

    def tokens(n: int) -> bytes:
        return rng.integers(0, 50_000, n, dtype=np.uint32).astype("<u4").tobytes()

    system = tokens(1000)
    rows: list[bytes] = []
    conversations = []
    for _ in range(args.conversations):
        conversation = system + tokens(29_000)
        conversations.append(conversation)
        rows.extend(conversation[: 4 * (1000 + 300 * p)] for p in range(1, args.points + 1))
    rows.extend(tokens(int(rng.integers(1, 30_000))) for _ in range(args.random))
    keys = [make_key_encoded(NS, row) for row in rows]

    trie = TokenTrie()
    start = time.perf_counter()
    for row, key in zip(rows, keys, strict=True):
        trie.insert(row, key)
    build = time.perf_counter() - start
    per_insert = build / len(rows) * 1e6
    print(
        f"rows {len(trie)}, nodes {trie.node_count()}, "
        f"build {build:.2f} s ({per_insert:.0f} us per insert)"
    )

    stored = set(keys)
    prompts = {
        "extends a conversation": conversations[3][: 4 * 29_500] + tokens(500),
        "diverges mid-edge": conversations[5][: 4 * 12_345] + tokens(17_655),
        "shares nothing": (np.arange(30_000, dtype=np.uint32) + 60_000).astype("<u4").tobytes(),
    }
    for name, prompt in prompts.items():
        match = trie.longest_prefix(prompt)
        lookup = _median_us(partial(trie.longest_prefix, prompt), args.runs)
        ranked = _median_us(partial(trie.candidates, prompt, 8, 512), args.runs)
        walk_call = partial(stride_walk, NS, prompt, 2048, 512, stored.__contains__)
        walk, walk_us = walk_call(), _median_us(walk_call, 50)
        common = match.common_len if match else 0
        print(
            f"{name:24} longest_prefix {lookup:7.1f} us (common {common:>6})  "
            f"candidates(8) {ranked:7.1f} us  stride walk {walk_us:7.1f} us "
            f"(found {walk.length:>6}, {walk.probes} probes)"
        )

    victims = keys[:: max(1, len(keys) // 1000)]
    start = time.perf_counter()
    for key in victims:
        trie.remove_key(key)
    removal = (time.perf_counter() - start) / len(victims) * 1e6
    print(
        f"remove {removal:.0f} us per row over {len(victims)} rows; check: {trie.check() or 'ok'}"
    )


if __name__ == "__main__":
    main()
