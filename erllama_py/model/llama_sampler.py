"""llama.cpp sampler chains of one context, by id.

The chain is penalties -> top-k -> top-p -> min-p -> temperature -> pick,
with the grammar sampler kept out of the chain and applied by hand: a
grammar can leave no allowed token, and llama.cpp then picks a token of
probability zero and aborts the process in ``llama_sampler_accept``; checking
before the accept turns that into `InvalidRequestError`. The pick is
``greedy`` or ``dist``; ``dist`` is replaced before every draw by one seeded
with `erllama_py.model.sampling.draw_seed` of (seed, position), so that a
resumed request draws exactly what one uninterrupted run would.

A sequence's logits are either a row of the context's output buffer or an
owned float32 copy. Sampling from an output row without a grammar goes
through llama.cpp's ``llama_sampler_sample``; from a copy, or with a grammar,
through a ``llama_token_data_array`` built with numpy over a preallocated
array and the same chain. Both apply the same samplers in the same order, so
identical logits give identical tokens.

Constrained draws (`SamplerChains._sample_constrained`) apply the grammar to
the whole vocabulary only when the unconstrained choice is banned and the few
likeliest tokens cannot decide the draw: the grammar's verdict on one token
costs microseconds, on 262,144 tokens about 100 ms. Greedy constrained output
is token for token what the grammar-first chain gives; a seeded draw keeps
the unconstrained choice whenever the grammar allows it (as llama.cpp's
common sampler does), so its tokens differ from a grammar-first draw's, but
it is always allowed and deterministic in (seed, position, logits).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import llama_cpp as _L
import numpy as np

from erllama_py.errors import InvalidRequestError, ModelError
from erllama_py.model.llama_grammar import GrammarCache, GrammarMask, GrammarStats, schema_gbnf
from erllama_py.model.sampling import draw_seed
from erllama_py.params import PENALTY_WINDOW, SamplingParams

__all__ = [
    "FEW_CANDIDATES",
    "REJECTION_DRAWS",
    "REJECTION_KNOWN",
    "Chain",
    "SamplerChains",
    "grammar_text",
]

FEW_CANDIDATES = (64, 1024)
"""Sizes of the sets of likeliest tokens a rejected draw tries the grammar on, in turn."""

REJECTION_KNOWN = (1024, 16384)
"""How many of the likeliest tokens a seeded constrained draw asks the grammar about, in turn."""

REJECTION_DRAWS = 2048
"""Draws tried after each of those before the next (and then the whole vocabulary)."""

_NEGLIGIBLE = 1e-6
"""A seeded constrained draw leaves out tokens only if, allowed or not, they would weigh
less than this share of the allowed ones: its distribution is then within this total
variation of the grammar-first draw's."""

_TD = ctypes.sizeof(_L.llama_token_data)
assert _TD == 12  # id:int32, logit:float32, p:float32 (the numpy view below relies on it)


def grammar_text(params: SamplingParams) -> str | None:
    """The GBNF grammar of ``params``: its ``grammar``, or its ``json_schema`` compiled.

    The compiler is llama-cpp-python's pure-Python
    ``llama_cpp.llama_grammar.json_schema_to_gbnf`` (start rule ``root``),
    cached per schema (`erllama_py.model.llama_grammar.schema_gbnf`).
    Raises `InvalidRequestError` for a schema it cannot compile.
    """
    if params.grammar is not None:
        return params.grammar
    if params.json_schema is None:
        return None
    return schema_gbnf(params.json_schema)


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

    def __init__(
        self, vocab: Any, ctx: Any, n_vocab: int, model_name: str, *, grammar_first: bool = False
    ) -> None:
        """``grammar_first`` applies a grammar to the whole vocabulary before every
        constrained draw (llama.cpp's plain way, several times slower): the reference
        the fast path is tested and measured against."""
        self.grammar_first = grammar_first
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
        self.grammar_stats = GrammarStats()
        self._grammars = GrammarCache(vocab, self.grammar_stats)
        self._mask = GrammarMask()

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
            param = "grammar" if params.grammar is not None else "json_schema"
            grammar = self._grammars.new(gtext, param)
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
        self._grammars.close()

    # ------------------------------------------------------------------ sampling

    def sample(self, ch: Chain, pos: int, row: int | None, logits: np.ndarray | None) -> int:
        """The token at position ``pos``: from the context's output ``row`` when no
        grammar needs the candidates, else from ``logits`` (a row view or a copy)."""
        if ch.dist:
            self._reseed(ch, pos)
        if ch.grammar is not None:
            assert logits is not None
            if self.grammar_first:
                return self._sample_grammar_first(ch, logits)
            return self._sample_constrained(ch, pos, logits)
        if row is not None and ch.plain_greedy:
            # The argmax of the row itself: llama_sampler_sample would first copy all
            # n_vocab logits into a candidate array (about 1-2 ms at 262k, per sequence
            # and token, a tenth of a decode step), then pick the same first largest.
            ptr = _L.llama_get_logits_ith(self._ctx, row)
            if not ptr:
                raise ModelError(f"llama.cpp has no logits for batch row {row}", self._model)
            return self._sample_array(ch, np.ctypeslib.as_array(ptr, shape=(self._nv,)))
        if row is not None:
            return int(_L.llama_sampler_sample(ch.ptr, self._ctx, row))
        assert logits is not None
        return self._sample_array(ch, logits)

    def _reseed(self, ch: Chain, pos: int) -> None:
        last = int(_L.llama_sampler_chain_n(ch.ptr)) - 1
        _L.llama_sampler_free(_L.llama_sampler_chain_remove(ch.ptr, last))
        _L.llama_sampler_chain_add(
            ch.ptr, _L.llama_sampler_init_dist(draw_seed(ch.params.seed, pos))
        )

    def _sample_array(self, ch: Chain, logits: np.ndarray) -> int:
        """``llama_sampler_sample`` on a float buffer (no grammar)."""
        token = self._pick(ch, logits)
        _L.llama_sampler_accept(ch.ptr, token)
        return token

    def _pick(self, ch: Chain, logits: np.ndarray) -> int:
        """The chain's choice from ``logits``, accepted by no sampler yet."""
        if ch.penalties_index is None and ch.params.greedy:
            # A plain greedy chain picks the first largest logit, as np.argmax does; this
            # skips building a 262k-entry candidate array.
            return int(np.argmax(logits))
        cur = self._fill(logits)
        _L.llama_sampler_apply(ch.ptr, ctypes.byref(cur))
        return self._selected(cur, constrained=False)

    def _fill(self, logits: np.ndarray) -> Any:
        """The reused whole-vocabulary candidate array, holding ``logits`` in id order."""
        td = self._td
        self._td_ids[:] = self._ids
        td[:, 1] = logits
        td[:, 2] = 0.0
        cur = self._cur
        cur.data = self._td_ptr
        cur.size = self._nv
        cur.selected = -1
        cur.sorted = False
        return cur

    def _selected(self, cur: Any, constrained: bool = True) -> int:
        sel = int(cur.selected)
        if not 0 <= sel < int(cur.size):
            raise ModelError(f"sampler selected no token ({sel})", self._model)
        picked = cur.data[sel]
        if constrained and not math.isfinite(float(picked.logit)):
            raise InvalidRequestError("the grammar allows no token at this point", param="grammar")
        return int(picked.id)

    def _sample_constrained(self, ch: Chain, pos: int, logits: np.ndarray) -> int:
        """Sample under ``ch.grammar``, applying it to as few tokens as decide the draw.

        First the chain picks as if unconstrained; if the grammar allows that
        token it is the draw (llama.cpp's own common sampler does the same).
        Otherwise the grammar is applied to the `FEW_CANDIDATES` likeliest
        tokens (after penalties) and, only if they cannot decide, to the whole
        vocabulary (`_constrained_pick`). A greedy draw is always the
        grammar-allowed token of the largest logit, the first in id order on a
        tie: exactly what applying the grammar to the whole vocabulary first
        gives. A seeded draw is deterministic in (seed, position, logits).
        """
        stats = self.grammar_stats
        stats.draws += 1
        token = self._pick(ch, logits)
        if self._mask.allows(ch.grammar, token):
            stats.first_pick += 1
        else:
            token = self._constrained_pick(ch, pos, logits)
        _L.llama_sampler_accept(ch.grammar, token)
        _L.llama_sampler_accept(ch.ptr, token)
        return token

    def _sample_grammar_first(self, ch: Chain, logits: np.ndarray) -> int:
        """The reference: the grammar on the whole vocabulary, then the chain."""
        cur = self._fill(logits)
        _L.llama_sampler_apply(ch.grammar, ctypes.byref(cur))
        if not np.isfinite(self._td[:, 1]).any():
            raise InvalidRequestError("the grammar allows no token at this point", param="grammar")
        _L.llama_sampler_apply(ch.ptr, ctypes.byref(cur))
        token = self._selected(cur)
        _L.llama_sampler_accept(ch.grammar, token)
        _L.llama_sampler_accept(ch.ptr, token)
        return token

    def _constrained_pick(self, ch: Chain, pos: int, logits: np.ndarray) -> int:
        stats = self.grammar_stats
        rest = 0 if ch.penalties_index is None else ch.penalties_index + 1
        vals = logits
        if ch.penalties_index is not None:
            # Penalties edit logits in place and keep the order: the penalized logits.
            cur = self._fill(logits)
            pen = _L.llama_sampler_chain_get(ch.ptr, ch.penalties_index)
            _L.llama_sampler_apply(pen, ctypes.byref(cur))
            vals = self._td[:, 1].copy()
        p = ch.params
        if not p.greedy and p.top_k == 0 and p.top_p >= 1.0 and p.min_p <= 0.0:
            token = self._rejection_pick(ch, pos, vals)
            if token is not None:
                stats.few += 1
                return token
        for k in FEW_CANDIDATES:
            if k >= self._nv:
                break
            threshold = np.partition(vals, self._nv - k)[self._nv - k]
            # Every token at least as likely as the k-th: ties are all in, in id order.
            ids = np.flatnonzero(vals >= threshold).astype(np.int32)
            masked = self._mask.mask(ch.grammar, ids, vals[ids])
            allowed = np.isfinite(masked)
            if not self._decided(ch, vals, masked, allowed, float(threshold)):
                continue
            stats.few += 1
            ids, masked = ids[allowed], masked[allowed]
            td = np.empty((len(ids), 3), dtype=np.float32)
            td.view(np.int32)[:, 0] = ids
            td[:, 1] = masked
            td[:, 2] = 0.0
            return self._apply_rest(ch, pos, rest, td)
        stats.full += 1
        cur = self._fill(vals)
        _L.llama_sampler_apply(ch.grammar, ctypes.byref(cur))
        # The grammar sampler edits logits in place without moving the data.
        if not np.isfinite(self._td[:, 1]).any():
            raise InvalidRequestError("the grammar allows no token at this point", param="grammar")
        if ch.dist:
            self._reseed(ch, pos)
        for i in range(rest, int(_L.llama_sampler_chain_n(ch.ptr))):
            _L.llama_sampler_apply(_L.llama_sampler_chain_get(ch.ptr, i), ctypes.byref(cur))
        return self._selected(cur)

    def _rejection_pick(self, ch: Chain, pos: int, vals: np.ndarray) -> int | None:
        """A draw from softmax(vals / temperature) over the allowed tokens, by rejection.

        Exact, without the grammar's verdict on most tokens: draw from the
        distribution of every token not known to be banned, keep the first draw
        the grammar allows. The unconstrained first pick was the first such draw;
        the next ones know the verdicts on the likeliest tokens (`REJECTION_KNOWN`),
        where nearly all the weight is, and ask the grammar about any other token
        drawn. The draws come from a generator seeded with (seed, position), so
        the token is deterministic. None when `REJECTION_DRAWS` draws after each
        step found nothing (the allowed tokens weigh too little to find).
        """
        nv = self._nv
        top = float(vals.max())
        if not math.isfinite(top):
            return None
        base = np.exp((vals.astype(np.float64) - top) / ch.params.temperature)
        verdict = np.zeros(nv, dtype=np.int8)  # 1 allowed, -1 banned, 0 not asked
        rng = np.random.default_rng(draw_seed(ch.params.seed, pos))
        for known in REJECTION_KNOWN:
            k = min(known, nv)
            threshold = np.partition(vals, nv - k)[nv - k]
            ids = np.flatnonzero((vals >= threshold) & (verdict == 0)).astype(np.int32)
            allowed = np.isfinite(self._mask.mask(ch.grammar, ids, vals[ids]))
            verdict[ids] = np.where(allowed, 1, -1)
            weight = np.where(verdict < 0, 0.0, base)
            cdf = np.cumsum(weight)
            total = float(cdf[-1])
            if not total > 0.0:
                return None
            for _ in range(REJECTION_DRAWS // 256):
                drawn = np.searchsorted(cdf, rng.random(256) * total, side="right")
                for x in np.minimum(drawn, nv - 1).tolist():
                    v = int(verdict[x])
                    if v == 0:
                        v = 1 if self._mask.allows(ch.grammar, x) else -1
                        verdict[x] = v
                    if v == 1:
                        return int(x)
            if k == nv:
                break
        return None

    def _decided(
        self, ch: Chain, vals: np.ndarray, masked: np.ndarray, allowed: np.ndarray, threshold: float
    ) -> bool:
        """Whether the allowed tokens among the likeliest ones (``masked``, every token
        whose logit in ``vals`` is at least ``threshold``) decide the draw."""
        n_ok = int(allowed.sum())
        if n_ok == 0:
            return False
        p = ch.params
        if p.greedy:
            return True  # the best allowed token is among them
        if p.top_k > 0 and n_ok >= p.top_k:
            return True  # top-k keeps exactly the same k tokens
        # Else the tokens left out, were the grammar to allow them all, must weigh
        # (after temperature) under _NEGLIGIBLE of the allowed ones.
        best = float(masked[allowed].max())
        t = p.temperature
        kept = float(np.exp((masked[allowed] - best) / t).sum())
        out = vals[vals < threshold]
        left_out = float(np.exp((out - best) / t).sum())
        return left_out < _NEGLIGIBLE * kept

    def _apply_rest(self, ch: Chain, pos: int, first: int, td: np.ndarray) -> int:
        """Apply the chain's samplers from index ``first`` on the candidates ``td``."""
        cur = _L.llama_token_data_array()
        ptr: Any = ctypes.cast(td.ctypes.data, _L.llama_token_data_p)
        cur.data = ptr
        cur.size = len(td)
        cur.selected = -1
        cur.sorted = False
        if ch.dist:
            self._reseed(ch, pos)
        for i in range(first, int(_L.llama_sampler_chain_n(ch.ptr))):
            _L.llama_sampler_apply(_L.llama_sampler_chain_get(ch.ptr, i), ctypes.byref(cur))
        return self._selected(cur)
