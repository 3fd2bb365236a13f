"""The least time any server can take to a turn's first token: raw llama.cpp prefilling
only the tokens the turn adds, in a context that still holds the rest.

For a replay whose turns resend a conversation, each turn's new tokens (its prompt
minus what the cache served) must be decoded by whoever answers; a server that kept
the conversation's KV cells live, with no restore at all, still pays that prefill and
one sample. `turn_floors` measures it on a `RawContext` configured like our worker
(one sequence per agent), after the servers have stopped, with stand-in token ids: a
decode's cost depends on how many tokens it holds and where, not on which they are.
"""

from __future__ import annotations

import time

import llama_cpp as _L

from bench.common import N_BATCH
from bench.warm_floor import RawContext

FILLER = 1000  # stand-in token ids start here (plain vocabulary, no control tokens)


def _tokens(n: int, offset: int) -> list[int]:
    return [FILLER + (offset + i) % 20000 for i in range(n)]


def turn_floors(turns: list[list[tuple[int, int]]], n_ctx: int) -> list[list[float]]:
    """Per agent, per turn in order, (prompt tokens, cached tokens) -> ms to decode the
    prompt's uncached tail into a sequence holding its cached head, and sample.

    Turns run in the replay's order (every agent's turn 1, then turn 2, ...). The
    cached head is made untimed: cut back when the sequence holds more, decoded when
    it holds less.
    """
    agents = len(turns)
    raw = RawContext(n_seq_max=agents, n_ctx=n_ctx)
    held = [0] * agents
    floors: list[list[float]] = [[] for _ in range(agents)]
    try:
        for t in range(max(len(a) for a in turns)):
            for a, agent in enumerate(turns):
                if t >= len(agent):
                    continue
                prompt, cached = agent[t]
                if held[a] > cached:
                    _L.llama_memory_seq_rm(raw.mem, a, cached, -1)
                    held[a] = cached
                _decode(raw, a, held, _tokens(cached - held[a], held[a]))
                started = time.perf_counter()
                rows = _decode(raw, a, held, _tokens(prompt - cached, cached))
                raw.argmax(rows[-1] if rows else -1)  # nothing new: the held logits
                floors[a].append((time.perf_counter() - started) * 1000.0)
    finally:
        raw.close()
    return floors


def _decode(raw: RawContext, seq: int, held: list[int], tokens: list[int]) -> list[int]:
    """Decode `tokens` into `seq` in `N_BATCH` slices; the batch rows of their last logits."""
    rows: list[int] = []
    for i in range(0, len(tokens), N_BATCH):
        rows = raw.decode([(seq, tokens[i : i + N_BATCH])], held)
    return rows
