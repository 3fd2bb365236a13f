"""Grammars of one context: compiled once per text, cloned per request, applied to few tokens.

Compiling is two steps, each cached: a ``json_schema`` becomes GBNF text
through llama-cpp-python's pure-Python converter (`schema_gbnf`, an LRU keyed
on the schema's JSON text), and GBNF text becomes a llama.cpp grammar sampler
through ``llama_sampler_init_grammar`` (`GrammarCache`, an LRU of pristine
samplers per context, keyed on the text; a request gets a
``llama_sampler_clone`` of one, which copies the parsed rules and the start
state without parsing again).

Applying a grammar costs per candidate token: llama.cpp decodes each token's
piece and walks it through every grammar stack, about 100 ms for gemma-3's
262,144-token vocabulary on 2 threads, several times a decode step. Its
verdict on a token does not depend on the other candidates, so
`GrammarMask.allows` (one token) and `GrammarMask.mask` (a few ids) give
exactly the verdicts the whole-vocabulary apply would give those tokens; the
sampler (`erllama_py.model.llama_sampler`) uses them to apply the grammar to
the whole vocabulary only when a handful of the likeliest tokens do not
decide the draw.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llama_cpp as _L
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from erllama_py.errors import InvalidRequestError
from erllama_py.model import llama_log

__all__ = ["GRAMMAR_CACHE_SIZE", "GrammarCache", "GrammarMask", "GrammarStats", "schema_gbnf"]

GRAMMAR_CACHE_SIZE = 32
"""Parsed grammars kept per context (and JSON schemas' GBNF texts per process)."""


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def schema_gbnf(json_schema: str) -> str:
    """The GBNF grammar (start rule ``root``) of a JSON schema given as JSON text.

    Raises `InvalidRequestError` for a schema the converter cannot compile
    (an exception is not cached: the same bad schema raises again).
    """
    try:
        text = json_schema_to_gbnf(json_schema)
    except Exception as e:  # the converter raises bare Exception/KeyError/... for bad schemas
        raise InvalidRequestError(
            f"json_schema: cannot compile to a grammar: {e}", param="json_schema"
        ) from e
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("json_schema: compiled to an empty grammar", param="json_schema")
    return text


@dataclass(slots=True)
class GrammarStats:
    """What the grammar cache and the constrained sampler did (for benches and tests)."""

    compiles: int = 0  # llama_sampler_init_grammar calls (cache misses)
    compile_ms: float = 0.0  # their total time
    cache_hits: int = 0
    draws: int = 0  # constrained draws
    first_pick: int = 0  # ... where the unconstrained choice was allowed
    few: int = 0  # ... decided by the grammar on a few of the likeliest tokens
    full: int = 0  # ... that needed the grammar on the whole vocabulary


class GrammarCache:
    """Pristine grammar samplers of one vocabulary, by GBNF text (LRU, `GRAMMAR_CACHE_SIZE`)."""

    def __init__(self, vocab: Any, stats: GrammarStats, capacity: int = GRAMMAR_CACHE_SIZE) -> None:
        self._vocab = vocab
        self._stats = stats
        self._capacity = capacity
        self._protos: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._protos)

    def new(self, text: str, param: str) -> Any:
        """A new grammar sampler (``llama_sampler*``, the caller frees it) in its start state.

        Raises:
            InvalidRequestError: the text does not parse (with the parser's message),
                naming ``param``.
        """
        proto = self._protos.get(text)
        if proto is None:
            proto = self._compile(text, param)
            self._protos[text] = proto
            if len(self._protos) > self._capacity:
                _, old = self._protos.popitem(last=False)
                _L.llama_sampler_free(old)
        else:
            self._protos.move_to_end(text)
            self._stats.cache_hits += 1
        return _L.llama_sampler_clone(proto)

    def _compile(self, text: str, param: str) -> Any:
        started = time.perf_counter()
        with llama_log.capture() as cap, llama_log.capture_stderr() as err:
            grammar = _L.llama_sampler_init_grammar(self._vocab, text.encode(), b"root")
        if not grammar:
            why = "; ".join(err.lines[:1] + cap.lines[:2]) or "the grammar does not parse"
            raise InvalidRequestError(f"invalid grammar: {why}", param=param)
        self._stats.compiles += 1
        self._stats.compile_ms += (time.perf_counter() - started) * 1000.0
        return grammar

    def close(self) -> None:
        for proto in self._protos.values():
            _L.llama_sampler_free(proto)
        self._protos.clear()


class GrammarMask:
    """A grammar's verdicts on chosen tokens, through small candidate arrays."""

    def __init__(self) -> None:
        self._one = np.zeros((1, 3), dtype=np.float32)
        self._one_cur = _L.llama_token_data_array()
        ptr: Any = ctypes.cast(self._one.ctypes.data, _L.llama_token_data_p)
        self._one_cur.data = ptr

    def allows(self, grammar: Any, token: int) -> bool:
        """Whether ``grammar`` lets ``token`` come next."""
        one = self._one
        one.view(np.int32)[0, 0] = token
        one[0, 1] = 0.0
        one[0, 2] = 0.0
        cur = self._one_cur
        cur.size = 1
        cur.selected = -1
        cur.sorted = False
        _L.llama_sampler_apply(grammar, ctypes.byref(cur))
        return bool(np.isfinite(one[0, 1]))

    def mask(self, grammar: Any, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """``logits`` of ``ids`` with the tokens ``grammar`` bans set to -inf (a new array)."""
        td = np.empty((len(ids), 3), dtype=np.float32)
        td.view(np.int32)[:, 0] = ids
        td[:, 1] = logits
        td[:, 2] = 0.0
        cur = _L.llama_token_data_array()
        ptr: Any = ctypes.cast(td.ctypes.data, _L.llama_token_data_p)
        cur.data = ptr
        cur.size = len(ids)
        cur.selected = -1
        cur.sorted = False
        _L.llama_sampler_apply(grammar, ctypes.byref(cur))
        return td[:, 1].copy()
