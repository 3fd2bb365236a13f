"""A deterministic backend without llama.cpp, for fast runtime tests.

It follows the :class:`~erllama_py.model.backend.Backend` protocol and the
llama backend's validation (token ids, positions, logits, batch size, KV
room) with the same exceptions, and reproduces the properties the runtime
relies on, not llama.cpp's values:

- tokenizer: whitespace split; a word's id is ``3 + xxh32(word) % (n_vocab - 3)``
  (ids 0, 1, 2 are ``<unk>``, BOS ``<s>`` and EOS/EOG ``</s>``); a reverse map
  keeps the first word seen for each id. A token's piece is ``b" " + word``
  (the decimal id for an id never produced by the tokenizer), special tokens
  render empty, and ``detokenize`` concatenates pieces, as SPM tokenizers do;
- a decode's token is a stable hash of the sequence's context (its token
  list, the stub's "KV cache") and of the sampler's temperature and seed, so
  the same context gives the same token, a stop-and-resume gives the tokens of
  one uninterrupted run, and a sampler given to the wrong sequence shows;
- "logits" are ``n_vocab`` float32 derived from the context; :meth:`pack`
  writes them and the token list (u32 little-endian, kind 2) in the
  :mod:`~erllama_py.model.statebuf` format, and :meth:`unpack` checks them;
- ``eog_after=N`` makes the decode after N generated tokens (counted since
  the last prefill, unpack or clear) return EOG; ``n_swa`` emulates the
  sliding-window truncation limit of an unpacked sequence; ``step_delay``
  sleeps in every step; ``fail_on_step`` and ``fail_hook`` inject failures.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from erllama_py.errors import (
    CacheFormatError,
    ContextOverflowError,
    InvalidRequestError,
    ModelError,
)
from erllama_py.model.backend import (
    BackendInfo,
    Generate,
    Op,
    Prefill,
    Sampled,
    StepResult,
    check_move,
    check_step,
    log_softmax_top,
    pack_to_new_buffer,
    validate_messages,
    validate_seq,
    validate_tokens,
)
from erllama_py.model.jinja_chat import generic_tool_messages
from erllama_py.model.statebuf import (
    FLAG_LOGITS,
    HEADER_SIZE,
    KIND_STUB,
    Allocate,
    StateBuffer,
    StateHeader,
    encode_header,
    logits_of,
    parse_header,
)
from erllama_py.params import SamplingParams

__all__ = ["STUB_BOS", "STUB_EOS", "STUB_UNK", "StubBackend", "stub_logits"]

STUB_UNK = 0
STUB_BOS = 1
STUB_EOS = 2
_SPECIAL = {STUB_UNK: "<unk>", STUB_BOS: "<s>", STUB_EOS: "</s>"}
_SPECIAL_IDS = {v: k for k, v in _SPECIAL.items()}
_EMBED_DIM = 16


def stub_logits(tokens: Sequence[int], n_vocab: int) -> np.ndarray:
    """The stub's deterministic float32 "logits" after the context ``tokens``."""
    h = xxhash.xxh64_intdigest(np.asarray(tokens, dtype="<u4").tobytes(), seed=0x10617)
    return np.random.default_rng(h).standard_normal(n_vocab, dtype=np.float32)


@dataclass(slots=True)
class _StubSeq:
    tokens: list[int] = field(default_factory=list)
    has_logits: bool = False
    generated: int = 0
    pos_min: int = 0

    def reset(self) -> None:
        self.tokens = []
        self.has_logits = False
        self.generated = 0
        self.pos_min = 0


class StubBackend:
    """Deterministic :class:`~erllama_py.model.backend.Backend` (see the module doc)."""

    def __init__(
        self,
        *,
        n_vocab: int = 32000,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_seq_max: int = 4,
        kv_size: int | None = None,
        n_swa: int = 0,
        eog_after: int | None = None,
        step_delay: float = 0.0,
        fail_on_step: int | None = None,
        fail_hook: Callable[[int, Sequence[Op]], None] | None = None,
        name: str = "stub",
    ) -> None:
        """Create a stub; ``fail_hook(step_number, ops)`` runs before each step
        (1-based) and may raise; ``fail_on_step=N`` raises ModelError on step N."""
        if n_vocab < 4:
            raise ValueError("n_vocab must be >= 4")
        self._nv = n_vocab
        self._seqs = [_StubSeq() for _ in range(n_seq_max)]
        self._samplers: dict[int, SamplingParams] = {}
        self._next_sampler = 1
        self._words: dict[int, str] = {}
        self._closed = False
        self.eog_after = eog_after
        self.step_delay = step_delay
        self.fail_on_step = fail_on_step
        self.fail_hook = fail_hook
        self.steps = 0
        params = {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_seq_max": n_seq_max, "n_swa": n_swa}
        fp = hashlib.sha256(b"erllama-stub-v1" + json.dumps(params, sort_keys=True).encode())
        self._info = BackendInfo(
            backend="stub",
            name=name,
            description="deterministic stub backend",
            architecture="stub",
            quant="none",
            file_size=0,
            fingerprint=fp.digest(),
            n_vocab=n_vocab,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_seq_max=n_seq_max,
            kv_size=kv_size if kv_size is not None else n_ctx,
            n_swa=n_swa,
            n_ctx_train=n_ctx,
            n_embd=_EMBED_DIM,
            bos=STUB_BOS,
            add_bos=True,
            eos=STUB_EOS,
            eog=(STUB_EOS,),
            add_space_prefix=True,
            chat_template=None,
            chat_template_fallback="stub",
            ctx_params={"stub": True},
        )

    @property
    def info(self) -> BackendInfo:
        """The stub's description (backend ``"stub"``)."""
        return self._info

    def _check(self) -> None:
        if self._closed:
            raise ModelError("the backend is closed", self._info.name)

    def _seq(self, seq: int) -> _StubSeq:
        self._check()
        return self._seqs[validate_seq(seq, len(self._seqs))]

    # ------------------------------------------------------------ tokenizer

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Whitespace tokens hashed into ``[3, n_vocab)``, BOS first if ``add_special``."""
        self._check()
        if not isinstance(text, str):
            raise InvalidRequestError("text must be a str", param="text")
        out = [STUB_BOS] if add_special else []
        for word in text.split():
            if parse_special and word in _SPECIAL_IDS:
                out.append(_SPECIAL_IDS[word])
                continue
            t = 3 + xxhash.xxh32_intdigest(word.encode("utf-8", "surrogatepass")) % (self._nv - 3)
            self._words.setdefault(t, word)
            out.append(t)
        return out

    def token_piece(self, token: int, special: bool = False) -> bytes:
        """``b" " + word`` (or the decimal id); special tokens render empty unless asked."""
        self._check()
        validate_tokens([token], self._nv)
        if token in _SPECIAL:
            return _SPECIAL[token].encode() if special else b""
        return b" " + self._words.get(token, str(token)).encode("utf-8", "surrogatepass")

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """The concatenated pieces of ``tokens``."""
        arr = validate_tokens(tokens, self._nv, allow_empty=True)
        return b"".join(self.token_piece(int(t), special) for t in arr)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """``"<role>: <content>\\n"`` per message (the template arguments are ignored; tools
        and tool turns become text as for any template without tool support)."""
        self._check()
        if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
            messages = generic_tool_messages(messages, tools)
        return "".join(f"{role}: {content}\n" for role, content in validate_messages(messages))

    # --------------------------------------------------------------- samplers

    def new_sampler(
        self, cfg: SamplingParams | Mapping[str, Any], history: Sequence[int] = ()
    ) -> int:
        """Register ``cfg``; a grammar without a ``root`` rule is refused like a parse error."""
        self._check()
        if isinstance(cfg, Mapping):
            cfg = SamplingParams.from_dict(cfg)
        if not isinstance(cfg, SamplingParams):
            raise InvalidRequestError("cfg must be a SamplingParams or a mapping", param="cfg")
        validate_tokens(history, self._nv, allow_empty=True)
        if cfg.grammar is not None and "root" not in cfg.grammar:
            raise InvalidRequestError("invalid grammar: no 'root' rule", param="grammar")
        sid = self._next_sampler
        self._next_sampler += 1
        self._samplers[sid] = cfg
        return sid

    def prime_sampler(self, sampler: int, tokens: Sequence[int]) -> None:
        """Accepted for protocol parity; the stub's tokens depend on the context anyway."""
        self._chain(sampler)
        validate_tokens(tokens, self._nv, allow_empty=True)

    def free_sampler(self, sampler: int) -> None:
        """Forget a sampler; twice is a no-op, an id never issued raises."""
        self._check()
        if self._samplers.pop(sampler, None) is None and not (
            isinstance(sampler, int) and 0 < sampler < self._next_sampler
        ):
            raise InvalidRequestError(f"unknown sampler {sampler!r}", param="sampler")

    @property
    def n_samplers(self) -> int:
        """Number of live samplers."""
        return len(self._samplers)

    def _chain(self, sampler: int) -> SamplingParams:
        self._check()
        cfg = self._samplers.get(sampler)
        if cfg is None:
            raise InvalidRequestError(f"unknown sampler {sampler!r}", param="sampler")
        return cfg

    def _next_token(self, st: _StubSeq, cfg: SamplingParams) -> int:
        h = xxhash.xxh64()
        h.update(np.asarray(st.tokens, dtype="<u4").tobytes())
        h.update(struct.pack("<dQ", float(cfg.temperature), cfg.seed))
        return 3 + h.intdigest() % (self._nv - 3)

    # ------------------------------------------------------------- sequences

    def tokens(self, seq: int) -> list[int]:
        """The context of ``seq`` (what its KV cache holds): for test assertions."""
        return list(self._seq(seq).tokens)

    def seq_len(self, seq: int) -> int:
        """Positions held by ``seq``."""
        return len(self._seq(seq).tokens)

    def seq_pos_min(self, seq: int) -> int:
        """First position held (-1 if empty); above 0 only after unpack with ``n_swa``."""
        st = self._seq(seq)
        return st.pos_min if st.tokens else -1

    def has_logits(self, seq: int) -> bool:
        """Whether ``seq`` can be decoded now."""
        return self._seq(seq).has_logits

    def clear_seq(self, seq: int) -> None:
        """Empty ``seq``."""
        self._seq(seq).reset()

    def move_seq(self, src: int, dst: int) -> None:
        """Move ``src``'s state to the empty ``dst``."""
        self._seq(src)
        check_move(src, dst, len(self._seq(dst).tokens))
        self._seqs[src], self._seqs[dst] = self._seqs[dst], self._seqs[src]
        self._seqs[src].reset()

    def truncate(self, seq: int, n: int) -> bool:
        """Keep ``[0, n)``; False (unchanged) if an emulated SWA window lacks cells."""
        st = self._seq(seq)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(st.tokens):
            raise InvalidRequestError(f"n must be in [0, {len(st.tokens)}], got {n!r}", param="n")
        if n == len(st.tokens):
            return True
        if n == 0:
            st.reset()
            return True
        n_swa = self._info.n_swa
        if n_swa > 0 and st.pos_min > max(0, n - n_swa):
            return False
        del st.tokens[n:]
        st.has_logits = False
        st.generated = 0
        return True

    def step(self, ops: Sequence[Op]) -> list[StepResult]:
        """Same contract and validation as the llama backend's ``step``."""
        self._check()
        checked = check_step(
            ops,
            self._info,
            seq_len=lambda seq: len(self._seqs[seq].tokens),
            has_logits=lambda seq: self._seqs[seq].has_logits,
            check_sampler=self._chain,
            used_cells=sum(len(s.tokens) for s in self._seqs),
        )
        plan = [
            (
                c.op,
                self._seqs[c.op.seq],
                c.tokens,
                None if isinstance(c.op, Prefill) else self._chain(c.op.sampler),
            )
            for c in checked
        ]
        self.steps += 1
        if self.fail_hook is not None:
            self.fail_hook(self.steps, ops)
        if self.fail_on_step is not None and self.steps == self.fail_on_step:
            raise ModelError(f"injected failure on step {self.steps}", self._info.name)
        if self.step_delay > 0:
            time.sleep(self.step_delay)

        results: list[StepResult] = []
        for op, st, arr, scfg in plan:
            if isinstance(op, Generate):
                assert scfg is not None
                if arr is not None:
                    st.tokens.append(int(arr[0]))
                    st.has_logits = True
                if self.eog_after is not None and st.generated >= self.eog_after:
                    results.append(self._with_logprobs(st, Sampled(STUB_EOS, True), op.logprobs))
                    continue
                st.generated += 1
                sampled = Sampled(self._next_token(st, scfg), False)
                results.append(self._with_logprobs(st, sampled, op.logprobs))
                continue
            if arr is not None:
                st.tokens.extend(int(t) for t in arr)
                st.has_logits = True
                st.generated = 0
                results.append(None)
                continue
            assert scfg is not None
            if self.eog_after is not None and st.generated >= self.eog_after:
                results.append(Sampled(STUB_EOS, True))
                continue
            token = self._next_token(st, scfg)
            st.tokens.append(token)
            st.generated += 1
            results.append(Sampled(token, False))
        return results

    def _with_logprobs(self, st: _StubSeq, sampled: Sampled, logprobs: int | None) -> Sampled:
        """`sampled` with its log-probability under the stub's logits of `st`'s context."""
        if logprobs is None:
            return sampled
        chosen, top = log_softmax_top(stub_logits(st.tokens, self._nv), sampled.token, logprobs)
        return sampled._replace(logprob=chosen, top=top)

    # ------------------------------------------------------------ pack/unpack

    def pack(self, seq: int, allow_no_logits: bool = False, canonical: bool = False) -> StateBuffer:
        """Save ``seq``: its logits (see :func:`stub_logits`) and token list."""
        return pack_to_new_buffer(self.pack_into, seq, allow_no_logits, canonical)

    def pack_into(
        self, seq: int, allocate: Allocate, allow_no_logits: bool = False, canonical: bool = False
    ) -> int:
        """`pack` into the place ``allocate(size)`` gives; returns the size."""
        st = self._seq(seq)
        if not st.has_logits and not allow_no_logits:
            raise InvalidRequestError(
                f"seq {seq} has no logits to save (pass allow_no_logits=True)", param="seq"
            )
        state = np.asarray(st.tokens, dtype="<u4").tobytes()
        h = StateHeader(
            kind=KIND_STUB,
            n_tokens=len(st.tokens),
            n_vocab=self._nv,
            logits_len=4 * self._nv if st.has_logits else 0,
            state_len=len(state),
            flags=FLAG_LOGITS if st.has_logits else 0,
        )
        target = allocate(h.total_size)
        try:
            view = target.view
            view[:HEADER_SIZE] = encode_header(h)
            if st.has_logits:
                lg = stub_logits(st.tokens, self._nv).tobytes()
                view[HEADER_SIZE : HEADER_SIZE + h.logits_len] = lg
            view[h.state_offset : h.total_size] = state
            del view
        finally:
            target.release()
        return h.total_size

    def unpack(self, seq: int, buf: StateBuffer | memoryview | bytes | bytearray) -> int:
        """Restore ``seq`` from a stub-packed buffer; CacheFormatError if malformed."""
        st = self._seq(seq)
        data = buf.view() if isinstance(buf, StateBuffer) else memoryview(buf).cast("B")
        h = parse_header(data)
        if h.kind != KIND_STUB:
            raise CacheFormatError("bad_kind", f"kind {h.kind} is not a stub state")
        if h.n_vocab != self._nv:
            raise CacheFormatError("vocab_mismatch", f"n_vocab {h.n_vocab}, stub has {self._nv}")
        if h.state_len != 4 * h.n_tokens:
            raise CacheFormatError("state_mismatch", "state length is not 4 * n_tokens")
        if h.n_tokens > self._info.n_ctx:
            raise ContextOverflowError(
                f"state of {h.n_tokens} tokens exceeds n_ctx {self._info.n_ctx}", self._info.name
            )
        used = sum(len(s.tokens) for s in self._seqs) - len(st.tokens)
        if used + h.n_tokens > self._info.kv_size:
            raise ContextOverflowError("the KV cache has no room for this state", self._info.name)
        toks = np.frombuffer(data, dtype="<u4", count=h.n_tokens, offset=h.state_offset)
        tokens = [int(t) for t in toks]
        del toks
        if tokens and max(tokens) >= self._nv:
            raise CacheFormatError("state_mismatch", "token id outside the vocabulary")
        if h.has_logits:
            stored = logits_of(data, h)
            same = bool(np.array_equal(stored, stub_logits(tokens, self._nv)))
            del stored
            if not same:
                raise CacheFormatError("state_mismatch", "logits do not match the tokens")
        st.reset()
        st.tokens = tokens
        st.has_logits = h.has_logits
        n_swa = self._info.n_swa
        st.pos_min = max(0, len(tokens) - n_swa) if n_swa > 0 else 0
        return len(tokens)

    # ------------------------------------------------------------ misc

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """16 deterministic floats derived from ``tokens``."""
        self._check()
        arr = validate_tokens(tokens, self._nv)
        if len(arr) > self._info.n_batch:
            raise InvalidRequestError(
                f"{len(arr)} tokens exceed n_batch {self._info.n_batch}", param="tokens"
            )
        h = xxhash.xxh64_intdigest(b"embed" + arr.astype("<u4").tobytes())
        return [float(x) for x in np.random.default_rng(h).standard_normal(_EMBED_DIM)]

    def close(self) -> None:
        """Forget everything (idempotent)."""
        self._closed = True
        self._samplers.clear()
