"""The constrained-sampling fast path against the grammar-first reference, on the tiny model.

The tiny model's random logits make the grammar reject most unconstrained
choices, so these runs go through all three ways a constrained draw is
decided (the first pick, the few likeliest tokens, the whole vocabulary).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import llama_cpp as _L
import pytest

from erllama_py.errors import InvalidRequestError
from erllama_py.model.backend import Decode, Prefill, Sampled
from erllama_py.model.llama_backend import LlamaBackend
from erllama_py.model.llama_grammar import GrammarCache, GrammarStats, schema_gbnf
from erllama_py.params import SamplingParams

PROMPT = "hello world the cat and the dog " * 6
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer"},
        "tag": {"type": "string", "enum": ["cat", "dog"]},
    },
    "required": ["ok", "n", "tag"],
}
WORDS = """root ::= w (" " w)? (" " w)? (" " w)? "."
w ::= "hello" | "world" | "cat" | "dog" | "the" | "and"
"""


@pytest.fixture(scope="module")
def pair(tiny_model_path: Path) -> Iterator[tuple[LlamaBackend, LlamaBackend]]:
    """The fast path and the grammar-first reference, on the same tiny model."""
    fast = LlamaBackend.load(tiny_model_path, n_ctx=512, n_batch=256, n_seq_max=2, n_threads=2)
    ref = LlamaBackend.load(
        tiny_model_path, n_ctx=512, n_batch=256, n_seq_max=2, n_threads=2, grammar_first=True
    )
    yield fast, ref
    fast.close()
    ref.close()


def generate(b: LlamaBackend, params: SamplingParams, n: int) -> list[int]:
    b.clear_seq(0)
    b.step([Prefill(0, b.tokenize(PROMPT))])
    s = b.new_sampler(params)
    out: list[int] = []
    try:
        for _ in range(n):
            r = b.step([Decode(0, s)])[0]
            assert isinstance(r, Sampled)
            out.append(r.token)
            if r.eog:
                break
    finally:
        b.free_sampler(s)
    return out


def text_of(b: LlamaBackend, tokens: list[int]) -> str:
    assert tokens[-1] in b.info.eog, "the grammar's sentence did not end"
    return b.detokenize(tokens[:-1]).decode()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams.from_dict({"json_schema": SCHEMA}),
        SamplingParams(grammar=WORDS),
        SamplingParams(grammar=WORDS, repeat_penalty=1.5, presence_penalty=0.5),
    ],
    ids=["json_schema", "grammar", "grammar+penalties"],
)
def test_greedy_constrained_output_equals_the_grammar_first_reference(
    pair: tuple[LlamaBackend, LlamaBackend], params: SamplingParams
) -> None:
    fast, ref = pair
    stats = fast.grammar_stats
    draws, few = stats.draws, stats.few
    got = generate(fast, params, 80)
    want = generate(ref, params, 80)
    assert got == want
    text = text_of(fast, got)
    if params.json_schema is not None:
        value = json.loads(text)
        assert set(value) == {"ok", "n", "tag"} and value["tag"] in ("cat", "dog")
    # every token was a constrained draw, some decided by the few likeliest tokens
    assert stats.draws - draws == len(got)
    assert stats.few > few


@pytest.mark.parametrize("top_k", [0, 5])
def test_seeded_constrained_output_is_valid_and_deterministic(
    pair: tuple[LlamaBackend, LlamaBackend], top_k: int
) -> None:
    fast, _ = pair
    params = SamplingParams.from_dict(
        {"json_schema": SCHEMA, "temperature": 1.0, "seed": 11, "top_k": top_k}
    )
    runs = [generate(fast, params, 80) for _ in range(2)]
    assert runs[0] == runs[1]
    value = json.loads(text_of(fast, runs[0]))
    assert set(value) == {"ok", "n", "tag"}
    assert isinstance(value["ok"], bool) and isinstance(value["n"], int)


def test_every_way_of_deciding_a_draw_is_taken(pair: tuple[LlamaBackend, LlamaBackend]) -> None:
    # A top-p draw whose allowed tokens sit far below the likeliest ones cannot be
    # decided by a few (top-p needs the weight of every allowed token): it falls back
    # to the whole vocabulary. A plain seeded draw is decided by rejection, never so.
    fast, _ = pair
    stats = fast.grammar_stats
    full = stats.full
    for seed in range(4):
        out = generate(
            fast, SamplingParams(grammar=WORDS, temperature=1.5, top_p=0.9, seed=seed), 40
        )
        assert text_of(fast, out).endswith(".")
    assert stats.full > full
    full, few = stats.full, stats.few
    for seed in range(4):
        out = generate(fast, SamplingParams(grammar=WORDS, temperature=1.5, seed=seed), 40)
        assert text_of(fast, out).endswith(".")
    assert stats.full == full and stats.few > few


def test_a_grammar_is_compiled_once_per_text(tiny_model_path: Path) -> None:
    b = LlamaBackend.load(tiny_model_path, n_ctx=128, n_batch=64, n_seq_max=1, n_threads=1)
    try:
        params = SamplingParams(grammar=WORDS)
        for _ in range(3):
            b.free_sampler(b.new_sampler(params))
        assert (b.grammar_stats.compiles, b.grammar_stats.cache_hits) == (1, 2)
        # A cloned grammar starts from the start state, not where the last one stopped.
        assert json.loads(text_of(b, generate(b, SamplingParams(grammar='root ::= "[1]"'), 10)))
        assert json.loads(text_of(b, generate(b, SamplingParams(grammar='root ::= "[1]"'), 10)))
        for _ in range(2):  # an invalid text raises every time: failures are not cached
            with pytest.raises(InvalidRequestError, match="invalid grammar"):
                b.new_sampler(SamplingParams(grammar="root ::= nowhere"))
        assert b.n_samplers == 0
    finally:
        b.close()


def test_the_grammar_cache_evicts_the_least_recently_used(tiny_model_path: Path) -> None:
    b = LlamaBackend.load(tiny_model_path, n_ctx=128, n_batch=64, n_seq_max=1, n_threads=1)
    stats = GrammarStats()
    cache = GrammarCache(_L.llama_model_get_vocab(b._model), stats, capacity=2)
    try:
        for text in ('root ::= "a"', 'root ::= "b"', 'root ::= "a"', 'root ::= "c"'):
            _L.llama_sampler_free(cache.new(text, "grammar"))
        assert len(cache) == 2 and (stats.compiles, stats.cache_hits) == (3, 1)
        _L.llama_sampler_free(cache.new('root ::= "a"', "grammar"))  # kept: used last but one
        _L.llama_sampler_free(cache.new('root ::= "b"', "grammar"))  # evicted by "c"
        assert (stats.compiles, stats.cache_hits) == (4, 2)
    finally:
        cache.close()
        b.close()


def test_schema_compilation_is_cached_and_failures_are_not() -> None:
    text = json.dumps(SCHEMA)
    first = schema_gbnf(text)
    hits, misses = schema_gbnf.cache_info().hits, schema_gbnf.cache_info().misses
    assert schema_gbnf(text) == first
    assert (schema_gbnf.cache_info().hits, schema_gbnf.cache_info().misses) == (hits + 1, misses)
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="cannot compile"):
            schema_gbnf(json.dumps({"type": "object", "properties": {"x": {"$ref": "#/nope"}}}))
