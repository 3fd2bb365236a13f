"""llama.cpp sampler chains of one context, by id.

The chain is penalties -> top-k -> top-p -> min-p -> temperature -> pick,
with the grammar sampler kept out of the chain and applied first by hand: a
grammar can leave no allowed token, and llama.cpp then picks a token of
probability zero and aborts the process in ``llama_sampler_accept``; checking
between the two steps turns that into `InvalidRequestError`. The pick is
``greedy`` or ``dist``; ``dist`` is replaced before every draw by one seeded
with `erllama_py.model.sampling.draw_seed` of (seed, position), so that a
resumed request draws exactly what one uninterrupted run would.

A sequence's logits are either a row of the context's output buffer or an
owned float32 copy. Sampling from an output row without a grammar goes
through llama.cpp's ``llama_sampler_sample``; from a copy, or with a grammar,
through a ``llama_token_data_array`` built with numpy over a preallocated
array and the same chain. Both apply the same samplers in the same order, so
identical logits give identical tokens.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import llama_cpp as _L
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from erllama_py.errors import InvalidRequestError, ModelError
from erllama_py.model import llama_log
from erllama_py.model.sampling import draw_seed
from erllama_py.params import PENALTY_WINDOW, SamplingParams

__all__ = ["Chain", "SamplerChains", "grammar_text"]

_TD = ctypes.sizeof(_L.llama_token_data)
assert _TD == 12  # id:int32, logit:float32, p:float32 (the numpy view below relies on it)


def grammar_text(params: SamplingParams) -> str | None:
    """The GBNF grammar of ``params``: its ``grammar``, or its ``json_schema`` compiled.

    The compiler is llama-cpp-python's pure-Python
    ``llama_cpp.llama_grammar.json_schema_to_gbnf`` (start rule ``root``).
    Raises `InvalidRequestError` for a schema it cannot compile.
    """
    if params.grammar is not None:
        return params.grammar
    if params.json_schema is None:
        return None
    try:
        text = json_schema_to_gbnf(params.json_schema)
    except Exception as e:  # the converter raises bare Exception/KeyError/... for bad schemas
        raise InvalidRequestError(
            f"json_schema: cannot compile to a grammar: {e}", param="json_schema"
        ) from e
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("json_schema: compiled to an empty grammar", param="json_schema")
    return text


@dataclass(slots=True)
class Chain:
    """One request's sampler: the llama.cpp chain and the grammar kept out of it."""

    ptr: Any  # llama_sampler* of the chain (penalties .. pick)
    grammar: Any  # llama_sampler* of the grammar, or None
    params: SamplingParams
    penalties_index: int | None
    dist: bool

    @property
    def plain_greedy(self) -> bool:
        """A greedy pick with nothing before it: the argmax of the logits."""
        return self.grammar is None and self.penalties_index is None and self.params.greedy

    def free(self) -> None:
        _L.llama_sampler_free(self.ptr)
        if self.grammar is not None:
            _L.llama_sampler_free(self.grammar)


class SamplerChains:
    """The sampler chains of one context, addressed by the ids `create` returns."""

    def __init__(self, vocab: Any, ctx: Any, n_vocab: int, model_name: str) -> None:
        self._vocab = vocab
        self._ctx = ctx
        self._nv = n_vocab
        self._model = model_name
        self._chains: dict[int, Chain] = {}
        self._next = 1
        # Reused llama_token_data array for sampling from a float buffer.
        self._td = np.zeros((n_vocab, 3), dtype=np.float32)
        self._td_ids = self._td.view(np.int32)[:, 0]
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._td_ptr: Any = ctypes.cast(self._td.ctypes.data, _L.llama_token_data_p)
        self._cur = _L.llama_token_data_array()

    def __len__(self) -> int:
        return len(self._chains)

    def create(self, params: SamplingParams, history: np.ndarray) -> int:
        """Build a chain for ``params``, prime its penalty window with ``history``.

        Raises:
            InvalidRequestError: the grammar or json_schema does not parse (the
                GBNF parser's message is included).
        """
        gtext = grammar_text(params)
        grammar = None
        if gtext is not None:
            with llama_log.capture() as cap, llama_log.capture_stderr() as err:
                grammar = _L.llama_sampler_init_grammar(self._vocab, gtext.encode(), b"root")
            if not grammar:
                why = "; ".join(err.lines[:1] + cap.lines[:2]) or "the grammar does not parse"
                param = "grammar" if params.grammar is not None else "json_schema"
                raise InvalidRequestError(f"invalid grammar: {why}", param=param)
        cparams = _L.llama_sampler_chain_default_params()
        cparams.no_perf = True
        chain = _L.llama_sampler_chain_init(cparams)
        pen_idx = None
        n = 0

        def add(s: Any) -> None:
            nonlocal n
            _L.llama_sampler_chain_add(chain, s)
            n += 1

        if params.penalized:
            pen_idx = n
            add(
                _L.llama_sampler_init_penalties(
                    self._nv,
                    PENALTY_WINDOW,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.greedy:
            add(_L.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(_L.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(_L.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(_L.llama_sampler_init_min_p(params.min_p, 1))
            add(_L.llama_sampler_init_temp(params.temperature))
            add(_L.llama_sampler_init_dist(draw_seed(params.seed, 0)))
        sid = self._next
        self._next += 1
        self._chains[sid] = Chain(chain, grammar, params, pen_idx, not params.greedy)
        self.prime(self._chains[sid], history)
        return sid

    def get(self, sampler: int) -> Chain:
        """The chain of an id; `InvalidRequestError` for an unknown one."""
        ch = self._chains.get(sampler)
        if ch is None:
            raise InvalidRequestError(f"unknown sampler {sampler!r}", param="sampler")
        return ch

    def check(self, sampler: int) -> None:
        """Raise `InvalidRequestError` unless the id names a live chain."""
        self.get(sampler)

    def prime(self, ch: Chain, tokens: np.ndarray) -> None:
        """Feed ``tokens`` (the last `PENALTY_WINDOW` count) to the penalty window only."""
        if ch.penalties_index is None or len(tokens) == 0:
            return
        pen = _L.llama_sampler_chain_get(ch.ptr, ch.penalties_index)
        for t in tokens[-PENALTY_WINDOW:]:
            _L.llama_sampler_accept(pen, int(t))

    def free(self, sampler: int) -> None:
        """Free a chain; freeing an id twice is a no-op, an id never issued raises."""
        ch = self._chains.pop(sampler, None)
        if ch is None:
            if not isinstance(sampler, int) or not 0 < sampler < self._next:
                raise InvalidRequestError(f"unknown sampler {sampler!r}", param="sampler")
            return
        ch.free()

    def close(self) -> None:
        for ch in self._chains.values():
            ch.free()
        self._chains.clear()

    # ------------------------------------------------------------------ sampling

    def sample(self, ch: Chain, pos: int, row: int | None, logits: np.ndarray | None) -> int:
        """The token at position ``pos``: from the context's output ``row`` when no
        grammar needs the candidates, else from ``logits`` (a row view or a copy)."""
        if ch.dist:
            last = int(_L.llama_sampler_chain_n(ch.ptr)) - 1
            _L.llama_sampler_free(_L.llama_sampler_chain_remove(ch.ptr, last))
            dist = _L.llama_sampler_init_dist(draw_seed(ch.params.seed, pos))
            _L.llama_sampler_chain_add(ch.ptr, dist)
        if row is not None and ch.grammar is None:
            return int(_L.llama_sampler_sample(ch.ptr, self._ctx, row))
        assert logits is not None
        return self._sample_array(ch, logits)

    def _sample_array(self, ch: Chain, logits: np.ndarray) -> int:
        """``llama_sampler_sample`` on a float buffer, with a grammar check."""
        if ch.plain_greedy:
            # A plain greedy chain picks the first largest logit, as np.argmax does; this
            # skips building a 262k-entry candidate array on the warm-start path.
            token = int(np.argmax(logits))
            _L.llama_sampler_accept(ch.ptr, token)
            return token
        td = self._td
        self._td_ids[:] = self._ids
        td[:, 1] = logits
        td[:, 2] = 0.0
        cur = self._cur
        cur.data = self._td_ptr
        cur.size = self._nv
        cur.selected = -1
        cur.sorted = False
        if ch.grammar is not None:
            _L.llama_sampler_apply(ch.grammar, ctypes.byref(cur))
            # The grammar sampler edits logits in place without moving the data.
            if not np.isfinite(td[:, 1]).any():
                raise InvalidRequestError(
                    "the grammar allows no token at this point", param="grammar"
                )
        _L.llama_sampler_apply(ch.ptr, ctypes.byref(cur))
        sel = int(cur.selected)
        if not 0 <= sel < int(cur.size):
            raise ModelError(f"sampler selected no token ({sel})", self._model)
        picked = cur.data[sel]
        token = int(picked.id)
        if ch.grammar is not None and not math.isfinite(float(picked.logit)):
            raise InvalidRequestError("the grammar allows no token at this point", param="grammar")
        if ch.grammar is not None:
            _L.llama_sampler_accept(ch.grammar, token)
        _L.llama_sampler_accept(ch.ptr, token)
        return token
