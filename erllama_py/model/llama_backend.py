"""The llama.cpp backend: one model, one context, many sequences.

Only llama-cpp-python's low-level ctypes module (``import llama_cpp``) is
used, wrapped in small typed helpers; never its ``Llama`` class.

Context layout
--------------
``n_ctx`` is the per-sequence limit (positions ``< n_ctx``). By default
(``kv_unified=False``) llama.cpp gives every sequence its own KV stream of
``kv_size / n_seq_max`` cells, and the context is created with
``kv_size = n_ctx * n_seq_max`` cells, so each sequence can hold ``n_ctx``
positions whatever the others hold.

That is also what makes results exact. Measured on gemma-3-270m: with a
unified cache (one pool shared by all sequences) the logits of a sequence
depend on where its cells sit among other sequences' cells: prefilling the
same 80 tokens while another sequence held cells changed the logits by up to
0.59, and decoding from the same restored state at another place by up to
1.17 (a flipped near-tie is then a different generation). With one stream
per sequence both were bit-identical, so a restored state or a resumed
generation computes exactly what the original did. (Decoding several
sequences in one batch still differs from decoding them alone: llama.cpp's
kernels depend on the batch size.)

``kv_unified=True`` remains available: every sequence then draws cells from
one pool of ``kv_size`` cells (default ``n_ctx``), so one sequence can grow to
``n_ctx`` but the sum of all sequence lengths stays ``<= kv_size`` (checked
before llama.cpp runs: :class:`ContextOverflowError`), and states restore into
contexts with any ``n_seq_max``.

What a saved sequence state depends on (measured with this llama.cpp):

- it restores into any sequence of a context with the same stream layout:
  with one stream per sequence the same ``n_seq_max`` (``n_stream mismatch``
  otherwise), with a unified cache any ``n_seq_max``; ``n_ctx`` may differ
  as long as the state fits;
- unified and per-sequence caches do not mix (``n_stream mismatch``);
- flash attention changes the V layout (``incompatible V transposition``);
- ``type_k`` / ``type_v`` change the row format;
- a state saved without ``swa_full`` restores into a context with it.

:attr:`BackendInfo.ctx_params` holds exactly these: ``type_k``, ``type_v``,
``flash_attn``, ``kv_unified``, ``n_stream`` (``n_seq_max`` when not unified,
else 1) and ``swa_full`` (kept because it changes the size of the state).

Sliding-window attention (gemma-3: ``n_swa`` 512)
-------------------------------------------------
The KV cache is then two caches (iSWA). The SWA one keeps only the last
``n_swa`` positions of a sequence that it still needs, and the per-sequence
state saves only those, so a restored sequence of length ``n`` holds its SWA
cells from about ``n - n_swa``; ``llama_memory_seq_pos_min`` (which reports the
SWA cache) says where they start and ``llama_memory_seq_pos_max`` where they end.
Cutting a sequence back to ``n`` positions is only exact if the SWA cells still
cover the window that ends at ``n``; llama-server's test,
``pos_min > max(0, n - n_swa)`` means data is missing, is what :meth:`truncate`
uses (it returns False and changes nothing). Without the test llama.cpp
happily removes the cells and leaves a silently wrong state. ``swa_full``
keeps every SWA cell (states 2-3x larger at 2,000 tokens) and lifts the limit;
it defaults to False here, llama.cpp's own default being True. Note too that a
sequence cut back below ``pos_min`` of its SWA cache reports ``pos_max == -1``
though its full-attention cells remain: this backend tracks lengths itself.

Modules
-------
This module is the core that owns the context: sequences, the step, pack and
unpack, embeddings. `erllama_py.model.gguf` reads and fingerprints the file
and describes the loaded model, `erllama_py.model.llama_vocab` tokenizes,
`erllama_py.model.llama_chat` renders built-in chat templates, and
`erllama_py.model.llama_sampler` owns the sampler chains.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import llama_cpp as _L
import numpy as np

from erllama_py.errors import (
    CacheFormatError,
    ConfigError,
    ContextOverflowError,
    InvalidRequestError,
    ModelError,
    ModelLoadError,
)
from erllama_py.model import llama_log
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
from erllama_py.model.gguf import (
    CHAT_FALLBACKS,
    FINGERPRINT_EDGE,
    check_model_file,
    describe_model,
    fingerprint_gguf,
    quant_name,
)
from erllama_py.model.jinja_chat import (
    generic_tool_messages,
    is_jinja,
    render_jinja,
    supports_tools,
)
from erllama_py.model.llama_chat import render_builtin
from erllama_py.model.llama_grammar import GrammarStats
from erllama_py.model.llama_sampler import Chain, SamplerChains, grammar_text
from erllama_py.model.llama_vocab import Vocab
from erllama_py.model.statebuf import (
    FLAG_LOGITS,
    HEADER_SIZE,
    KIND_LLAMA,
    Allocate,
    StateBuffer,
    StateHeader,
    buffer_address,
    encode_header,
    logits_of,
    parse_header,
)
from erllama_py.params import SamplingParams

__all__ = [
    "CHAT_FALLBACKS",
    "FINGERPRINT_EDGE",
    "KV_TYPES",
    "LlamaBackend",
    "fingerprint_gguf",
    "grammar_text",
    "quant_name",
]

P = ParamSpec("P")
R = TypeVar("R")

KV_TYPES: Mapping[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "bf16": 30,
}
"""KV cache element types accepted by ``type_k`` / ``type_v`` (ggml type ids)."""

_POOLING_MEAN = 1

_init_lock = threading.Lock()
_process: dict[str, bool] = {"backend_ready": False}


def _ensure_backend() -> None:
    with _init_lock:
        llama_log.install()
        if not _process["backend_ready"]:
            _L.llama_backend_init()
            _process["backend_ready"] = True


@dataclass(slots=True)
class _Seq:
    n: int = 0
    row: int | None = None  # batch index of the last decode that produced our logits
    logits: np.ndarray | None = None  # owned float32 copy

    @property
    def has_logits(self) -> bool:
        return self.row is not None or self.logits is not None

    def reset(self) -> None:
        self.n = 0
        self.row = None
        self.logits = None


_Method = Callable[Concatenate["LlamaBackend", P], R]


def _api(fn: _Method[P, R]) -> _Method[P, R]:
    """Serialise calls on one backend and refuse them after close()."""

    @functools.wraps(fn)
    def wrapper(self: LlamaBackend, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            if self._closed:
                raise ModelError("the backend is closed", self._info.name)
            return fn(self, *args, **kwargs)

    return wrapper


class LlamaBackend:
    """A llama.cpp model and context serving several sequences; see the module doc.

    Create with :meth:`load`. Calls are serialised by a lock; a backend is
    meant to be driven by one worker loop.
    """

    def __init__(
        self,
        model: Any,
        ctx: Any,
        *,
        info: BackendInfo,
        n_threads: int,
        flash_attn: bool,
        grammar_first: bool = False,
    ) -> None:
        """Take ownership of a loaded model and context; use :meth:`load`."""
        self._model = model
        self._ctx = ctx
        self._info = info
        self._vocab = Vocab(_L.llama_model_get_vocab(model))
        self._mem = _L.llama_get_memory(ctx)
        self._n_threads = n_threads
        self._flash_attn = flash_attn
        self._lock = threading.RLock()
        self._closed = False
        self._nv = info.n_vocab
        self._eog = frozenset(info.eog)
        self._seqs = [_Seq() for _ in range(info.n_seq_max)]
        self._samplers = SamplerChains(
            self._vocab.ptr, ctx, info.n_vocab, info.name, grammar_first=grammar_first
        )
        self._embed_ctx: Any = None

        nb = info.n_batch
        self._batch = _L.llama_batch_init(nb, 0, info.n_seq_max)
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(nb,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(nb,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(nb,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(nb,))
        # llama_batch_init allocates one seq_id array per token: no single numpy view.
        self._b_sid = [self._batch.seq_id[i] for i in range(nb)]

    # ------------------------------------------------------------------ load

    @classmethod
    def load(
        cls,
        model_path: str | os.PathLike[str],
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_seq_max: int = 4,
        n_threads: int | None = None,
        *,
        n_ubatch: int | None = None,
        kv_unified: bool = False,
        kv_size: int | None = None,
        swa_full: bool = False,
        flash_attn: bool | None = None,
        type_k: str = "f16",
        type_v: str = "f16",
        n_gpu_layers: int = 0,
        chat_template_fallback: str | None = None,
        full_fingerprint: bool = False,
        grammar_first: bool = False,
    ) -> LlamaBackend:
        """Load a GGUF model and create its context.

        ``n_ctx`` is the per-sequence position limit and ``n_batch`` the most
        tokens one :meth:`step` may carry (``n_ubatch``, default ``n_batch``, is
        llama.cpp's physical batch). ``kv_unified=False`` gives each of the
        ``n_seq_max`` sequences its own KV stream of ``n_ctx`` cells;
        ``kv_unified=True`` shares one pool of ``kv_size`` cells (default
        ``n_ctx``) among them (see the module doc for the trade-off).
        ``swa_full`` keeps every sliding-window cell (larger states, no
        truncation limit). ``flash_attn``, ``type_k`` and ``type_v`` shape the KV
        rows, so saved states only restore into contexts with the same values.
        ``flash_attn=None`` (auto) turns flash attention off for models with a
        sliding window and on otherwise: with it, a sliding-window cache that
        wrapped around keeps its cells in another order than a restored one,
        and flash attention's reductions then differ (gemma-3: logits off by
        up to 0.9 after a restore past 512 tokens; exactly equal without it).
        ``n_threads`` defaults to the CPUs this process may run on.
        ``full_fingerprint`` hashes the whole file instead of its header and ends.
        ``grammar_first`` applies grammars to the whole vocabulary before every
        constrained draw (the slow reference of `erllama_py.model.llama_sampler`).
        ``chat_template_fallback`` is the llama.cpp built-in template name (or
        template text) used when the GGUF has no template; by default it is
        chosen from the architecture (:data:`CHAT_FALLBACKS`). Raises
        :class:`ModelLoadError` for a missing, empty, non-GGUF, truncated or
        otherwise unloadable file (with llama.cpp's own error line), and
        :class:`ConfigError` for invalid options. Some corrupt files make
        llama.cpp abort the process instead (a vocabulary with a duplicate
        token does): load untrusted files in a worker process.
        """
        path = Path(model_path)
        _validate_options(
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_seq_max=n_seq_max,
            n_threads=n_threads,
            n_ubatch=n_ubatch,
            kv_size=kv_size,
            type_k=type_k,
            type_v=type_v,
        )
        file_size = check_model_file(path)
        _ensure_backend()
        threads = n_threads or max(1, len(os.sched_getaffinity(0)))
        ubatch = n_ubatch or n_batch
        if kv_size is None:
            kv_size = n_ctx if kv_unified else n_ctx * n_seq_max

        mp = _L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        with llama_log.capture() as cap:
            model = _L.llama_model_load_from_file(os.fsencode(path), mp)
        if not model:
            why = cap.summary() or "llama.cpp refused the file"
            raise ModelLoadError(f"cannot load {path}: {why}", path.stem)
        ctx = None
        if flash_attn is None:
            flash_attn = int(_L.llama_model_n_swa(model)) == 0
        try:
            _check_training_context(n_ctx, int(_L.llama_model_n_ctx_train(model)))
            cp = _L.llama_context_default_params()
            cp.n_ctx = kv_size
            cp.n_batch = n_batch
            cp.n_ubatch = ubatch
            cp.n_seq_max = n_seq_max
            cp.n_threads = threads
            cp.n_threads_batch = threads
            cp.swa_full = swa_full
            cp.kv_unified = kv_unified
            cp.flash_attn_type = 1 if flash_attn else 0
            cp.type_k = KV_TYPES[type_k]
            cp.type_v = KV_TYPES[type_v]
            cp.no_perf = True
            cp.embeddings = False
            with llama_log.capture() as cap:
                ctx = _L.llama_init_from_model(model, cp)
            if not ctx:
                why = cap.summary() or "llama_init_from_model returned NULL"
                raise ModelLoadError(f"cannot create a context for {path}: {why}", path.stem)
            # llama.cpp may lower n_batch (to the KV size, for one); use what it took.
            n_batch = int(_L.llama_n_batch(ctx))
            n_ctx_seq = int(_L.llama_n_ctx_seq(ctx))
            if n_ctx_seq < n_ctx:
                raise ConfigError(
                    "kv_size", f"gives {n_ctx_seq} cells per sequence, fewer than n_ctx {n_ctx}"
                )
            info = describe_model(
                model,
                path,
                file_size,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=int(_L.llama_n_ubatch(ctx)),
                n_seq_max=n_seq_max,
                kv_size=kv_size,
                ctx_params={
                    "type_k": type_k,
                    "type_v": type_v,
                    "flash_attn": flash_attn,
                    "kv_unified": kv_unified,
                    "n_stream": 1 if kv_unified else n_seq_max,
                    "swa_full": swa_full,
                },
                fallback=chat_template_fallback,
                full_fingerprint=full_fingerprint,
            )
        except BaseException:
            if ctx:
                _L.llama_free(ctx)
            _L.llama_model_free(model)
            raise
        return cls(
            model,
            ctx,
            info=info,
            n_threads=threads,
            flash_attn=flash_attn,
            grammar_first=grammar_first,
        )

    @property
    def info(self) -> BackendInfo:
        """The model and context description."""
        return self._info

    # ------------------------------------------------------------ tokenizer

    @_api
    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``; raises InvalidRequestError for non-text input."""
        return self._vocab.tokenize(text, add_special, parse_special)

    @_api
    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """Concatenated token pieces; special tokens render empty unless ``special``.

        Concatenation means ``detokenize(a + b) == detokenize(a) + detokenize(b)``;
        for SPM vocabularies with ``add_space_prefix`` the text starts with the
        space the tokenizer added.
        """
        return self._vocab.detokenize(self._token_array(tokens, allow_empty=True), special)

    @_api
    def token_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token."""
        self._token_array([token])
        return self._vocab.piece(int(token), special)

    # ---------------------------------------------------------- chat template

    @_api
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render ``messages`` (and ``tools``) with ``template`` (Jinja text, or a llama.cpp
        built-in name such as ``"gemma"``, ``"chatml"``, ``"llama3"``), else the GGUF's
        template, else the model's fallback.

        Jinja templates run in a sandbox (`erllama_py.model.jinja_chat`); a
        built-in name goes to ``llama_chat_apply_template``. A leading BOS that
        the template writes is dropped when tokenizing adds one anyway. Tools
        and tool turns reach a template without tool support as a generic
        system prompt and text. Raises InvalidRequestError for a malformed
        message, no usable template, a template that fails or refuses, or
        one llama.cpp does not know.
        """
        tmpl = template or self._info.chat_template or self._info.chat_template_fallback
        if not tmpl:
            raise InvalidRequestError(
                "the model has no chat template; pass template= (e.g. 'chatml')",
                param="template",
            )
        raw: object = messages
        if (
            not isinstance(raw, list | tuple)
            or not raw
            or not all(isinstance(m, Mapping) for m in raw)
        ):
            validate_messages(messages)  # raises the precise error
        if not supports_tools(tmpl) and (
            tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
        ):
            messages = generic_tool_messages(messages, tools)
            tools = None
        if not is_jinja(tmpl):
            return render_builtin(tmpl, validate_messages(messages), add_generation_prompt)
        bos = self._special_text(self._info.bos)
        text = render_jinja(
            tmpl, messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=bos, eos_token=self._special_text(self._info.eos),
        )  # fmt: skip
        if bos and self._info.add_bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    def _special_text(self, token: int | None) -> str:
        if token is None:
            return ""
        return self._vocab.piece(token, True).decode("utf-8", errors="replace")

    # --------------------------------------------------------------- samplers

    @_api
    def new_sampler(
        self, cfg: SamplingParams | Mapping[str, Any], history: Sequence[int] = ()
    ) -> int:
        """Create a sampler chain for ``cfg``; ``history`` primes its penalty window.

        Raises InvalidRequestError for an invalid grammar or json_schema (the
        GBNF parser's message is included) or invalid history token ids.
        """
        if isinstance(cfg, Mapping):
            cfg = SamplingParams.from_dict(cfg)
        if not isinstance(cfg, SamplingParams):
            raise InvalidRequestError("cfg must be a SamplingParams or a mapping", param="cfg")
        return self._samplers.create(cfg, self._token_array(history, allow_empty=True))

    @_api
    def prime_sampler(self, sampler: int, tokens: Sequence[int]) -> None:
        """Feed ``tokens`` (the last 64 count) to the sampler's penalty window only."""
        self._samplers.prime(
            self._samplers.get(sampler), self._token_array(tokens, allow_empty=True)
        )

    @_api
    def free_sampler(self, sampler: int) -> None:
        """Free a sampler; freeing an id twice is a no-op, an id never issued raises."""
        self._samplers.free(sampler)

    @property
    def grammar_stats(self) -> GrammarStats:
        """Counters of the grammar cache and of constrained draws (live, not a copy)."""
        return self._samplers.grammar_stats

    @property
    def n_samplers(self) -> int:
        """Number of live samplers (for leak checks)."""
        return len(self._samplers)

    def _sample(self, ch: Chain, st: _Seq) -> int:
        if st.row is not None and ch.grammar is None:
            return self._samplers.sample(ch, st.n, st.row, None)
        logits = st.logits if st.logits is not None else self._row_view(st.row)
        return self._samplers.sample(ch, st.n, None, logits)

    def _sampled(self, ch: Chain, st: _Seq, logprobs: int | None) -> Sampled:
        """Sample `st`'s next token; with `logprobs`, from logits read before the sampler
        runs (the sampler never edits them: the grammar works on a copy)."""
        if logprobs is None:
            token = self._sample(ch, st)
            return Sampled(token, token in self._eog)
        logits = st.logits if st.logits is not None else self._row_view(st.row)
        token = self._sample(ch, st)
        chosen, top = log_softmax_top(logits, token, logprobs)
        return Sampled(token, token in self._eog, chosen, top)

    @_api
    def sample_logits(self, sampler: int, logits: np.ndarray, pos: int) -> int:
        """Sample from an arbitrary float32 logits array as if at position ``pos``.

        Advances the sampler exactly as a :class:`Decode` would. For tests and
        tools (the numpy path); a step never needs it.
        """
        arr = np.ascontiguousarray(logits, dtype=np.float32)
        if arr.shape != (self._nv,):
            raise InvalidRequestError(f"logits must have shape ({self._nv},)", param="logits")
        return self._sample(self._samplers.get(sampler), _Seq(n=pos, logits=arr))

    # ---------------------------------------------------------- sequences

    def _seq(self, seq: int) -> _Seq:
        return self._seqs[validate_seq(seq, len(self._seqs))]

    def _token_array(self, tokens: Sequence[int], allow_empty: bool = False) -> np.ndarray:
        return validate_tokens(tokens, self._nv, allow_empty)

    def _row_view(self, row: int | None) -> np.ndarray:
        ptr = _L.llama_get_logits_ith(self._ctx, row)
        if not ptr:
            raise ModelError(f"llama.cpp has no logits for batch row {row}", self._info.name)
        return np.ctypeslib.as_array(ptr, shape=(self._nv,))

    def _used_cells(self) -> int:
        return sum(s.n for s in self._seqs)

    @_api
    def seq_len(self, seq: int) -> int:
        """Positions held by ``seq``."""
        return self._seq(seq).n

    @_api
    def seq_pos_min(self, seq: int) -> int:
        """``llama_memory_seq_pos_min``: first position still in the (SWA) cache, or -1."""
        self._seq(seq)
        return int(_L.llama_memory_seq_pos_min(self._mem, seq))

    @_api
    def has_logits(self, seq: int) -> bool:
        """Whether ``seq`` can be decoded now."""
        return self._seq(seq).has_logits

    @_api
    def clear_seq(self, seq: int) -> None:
        """Remove every cell of ``seq`` and forget its logits."""
        self._seq(seq)
        self._clear(seq)

    @_api
    def move_seq(self, src: int, dst: int) -> None:
        """Move ``src``'s cells and logits to the empty ``dst``; see :meth:`Backend.move_seq`.

        Without a unified KV cache llama.cpp copies the whole stream (all of its
        ``n_ctx`` cells, when the next decode runs): a fixed cost per move, about
        a third of a decode step on gemma-3-270m at n_ctx 4096.
        """
        a, b = self._seq(src), self._seq(dst)
        check_move(src, dst, b.n)
        _L.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        _L.llama_memory_seq_rm(self._mem, src, -1, -1)
        b.n, b.row, b.logits = a.n, a.row, a.logits
        a.reset()

    def _clear(self, seq: int) -> None:
        _L.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._seqs[seq].reset()

    @_api
    def truncate(self, seq: int, n: int) -> bool:
        """Keep positions ``[0, n)`` of ``seq``.

        Returns False, changing nothing, when the sliding-window cells needed
        after the cut are gone (see the module doc) or llama.cpp refuses.
        Raises InvalidRequestError if ``n`` is negative or beyond the length.
        """
        st = self._seq(seq)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= st.n:
            raise InvalidRequestError(f"n must be in [0, {st.n}], got {n!r}", param="n")
        if n == st.n:
            return True
        if n == 0:
            self._clear(seq)
            return True
        n_swa = self._info.n_swa
        if n_swa > 0:
            pos_min = int(_L.llama_memory_seq_pos_min(self._mem, seq))
            if pos_min > max(0, n - n_swa):
                return False
        if not _L.llama_memory_seq_rm(self._mem, seq, n, -1):
            return False
        st.n = n
        st.row = None
        st.logits = None
        return True

    # ------------------------------------------------------------------ step

    @_api
    def step(self, ops: Sequence[Op]) -> list[StepResult]:
        """Run ``ops`` in one ``llama_decode``; see :class:`Prefill` and :class:`Decode`.

        Everything is validated first (seq ids, no seq twice, known samplers,
        token ids, logits present for decodes, positions ``< n_ctx``, the batch
        ``<= n_batch``, free KV cells), raising InvalidRequestError or
        ContextOverflowError with nothing changed. Then decode ops sample, and
        one batch is decoded (in ascending seq order; the results are in op
        order). If llama.cpp fails the decode
        (ModelError), the samplers of the decode ops have already advanced and
        the sequences in the batch lose their logits: fail those requests.
        """
        checked = check_step(
            ops,
            self._info,
            seq_len=lambda seq: self._seqs[seq].n,
            has_logits=lambda seq: self._seqs[seq].has_logits,
            check_sampler=self._samplers.check,
            used_cells=self._used_cells(),
        )
        plan = [
            (
                c.op,
                self._seqs[c.op.seq],
                c.tokens,
                None if isinstance(c.op, Prefill) else self._samplers.get(c.op.sampler),
            )
            for c in checked
        ]

        results: list[StepResult] = [None] * len(plan)
        rows: list[tuple[int, int, int]] = []  # (seq, tokens added, batch row of its logits)
        # Generate ops that sample after the decode, and the log-probabilities they want.
        after: list[tuple[int, _Seq, Chain, int | None]] = []
        sid = self._b_sid
        k = 0
        # The batch holds the ops in ascending seq order: without a unified KV cache,
        # llama.cpp puts sequences in one ubatch only while their ids are consecutive
        # in batch order (split_equal), so any other order decodes one ubatch per
        # sequence, a whole model pass each.
        for i in sorted(range(len(plan)), key=lambda i: plan[i][0].seq):
            op, st, arr, chain = plan[i]
            if isinstance(op, Generate):
                assert chain is not None
                if arr is None:
                    results[i] = self._sampled(chain, st, op.logprobs)
                    continue
                self._b_token[k] = arr[0]
                self._b_pos[k] = st.n
                sid[k][0] = op.seq
                rows.append((op.seq, 1, k))
                k += 1
                after.append((i, st, chain, op.logprobs))
                continue
            if arr is not None:
                n = len(arr)
                self._b_token[k : k + n] = arr
                self._b_pos[k : k + n] = np.arange(st.n, st.n + n, dtype=np.int32)
                for j in range(k, k + n):
                    sid[j][0] = op.seq
                rows.append((op.seq, n, k + n - 1))
                k += n
            else:
                assert chain is not None
                token = self._sample(chain, st)
                eog = token in self._eog
                results[i] = Sampled(token, eog)
                if not eog:
                    self._b_token[k] = token
                    self._b_pos[k] = st.n
                    sid[k][0] = op.seq
                    rows.append((op.seq, 1, k))
                    k += 1
        if k == 0:
            return results
        self._b_nseq[:k] = 1
        self._b_logits[:k] = 0
        self._b_logits[[r for _, _, r in rows]] = 1
        self._batch.n_tokens = k

        # Rows of the previous decode are overwritten now: copy out the logits of
        # sequences that keep them (not in this batch, or sampled EOG).
        fresh = {seq for seq, _, _ in rows}
        for seq, st in enumerate(self._seqs):
            if st.row is not None and seq not in fresh:
                st.logits = self._row_view(st.row).copy()
                st.row = None
        for seq in fresh:
            self._seqs[seq].row = None
            self._seqs[seq].logits = None

        rc = int(_L.llama_decode(self._ctx, self._batch))
        if rc != 0:
            if rc != 1:  # 1 = no KV slot, memory restored; otherwise ubatches done stay
                for seq in fresh:
                    self._seqs[seq].n = int(_L.llama_memory_seq_pos_max(self._mem, seq)) + 1
            raise ModelError(f"llama_decode failed with status {rc}", self._info.name)
        for seq, n, row in rows:
            self._seqs[seq].n += n
            self._seqs[seq].row = row
        for i, st, chain, logprobs in after:
            results[i] = self._sampled(chain, st, logprobs)
        return results

    # ------------------------------------------------------------ pack/unpack

    def pack(self, seq: int, allow_no_logits: bool = False, canonical: bool = False) -> StateBuffer:
        """Save ``seq`` into a new sealed :class:`StateBuffer` (format in statebuf).

        ``canonical``: on a sliding-window model, a sequence longer than the
        window keeps cells that fell out of it (masked, but still in the
        attention's reductions) and lays its cells out otherwise than a
        restore does; its next tokens then differ slightly from those of a
        restored copy (measured on gemma-3: logits off by ~0.3 past 512
        tokens). Restoring the packed state into the sequence itself makes the
        live run continue exactly as any later restore of this state will.

        The logits of the last position are stored with the state so that a
        restore samples from exactly them. A sequence without logits (after a
        truncate, or empty) raises InvalidRequestError unless
        ``allow_no_logits``, which writes no logits section: such a state needs
        a prefill after unpack before it can be decoded. The state bytes are
        written by ``llama_state_seq_get_data`` straight into the mapping.
        """
        return pack_to_new_buffer(self.pack_into, seq, allow_no_logits, canonical)

    @_api
    def pack_into(
        self, seq: int, allocate: Allocate, allow_no_logits: bool = False, canonical: bool = False
    ) -> int:
        """`pack` into the place ``allocate(size)`` gives; returns the size (see Backend)."""
        st = self._seq(seq)
        if not st.has_logits and not allow_no_logits:
            raise InvalidRequestError(
                f"seq {seq} has no logits to save (pass allow_no_logits=True)", param="seq"
            )
        state_len = int(_L.llama_state_seq_get_size(self._ctx, seq))
        has = st.has_logits
        h = StateHeader(
            kind=KIND_LLAMA,
            n_tokens=st.n,
            n_vocab=self._nv,
            logits_len=4 * self._nv if has else 0,
            state_len=state_len,
            flags=FLAG_LOGITS if has else 0,
        )
        target = allocate(h.total_size)
        try:
            target.view[:HEADER_SIZE] = encode_header(h)
            if has:
                src = st.logits if st.logits is not None else self._row_view(st.row)
                ctypes.memmove(target.address + HEADER_SIZE, src.ctypes.data, h.logits_len)
            dst = ctypes.cast(target.address + h.state_offset, ctypes.POINTER(ctypes.c_uint8))
            with llama_log.capture() as cap:
                written = int(_L.llama_state_seq_get_data(self._ctx, dst, state_len, seq))
            if written != state_len:
                raise ModelError(
                    f"llama_state_seq_get_data wrote {written} of {state_len} bytes"
                    f"{': ' + cap.summary() if cap.lines else ''}",
                    self._info.name,
                )
            if canonical and has and 0 < self._info.n_swa < st.n:
                self._unpack(seq, target.view)
        finally:
            target.release()
        return h.total_size

    @_api
    def unpack(self, seq: int, buf: StateBuffer | memoryview | bytes | bytearray) -> int:
        """Replace ``seq`` with a packed state (see `_unpack`)."""
        return self._unpack(seq, buf)

    def _unpack(self, seq: int, buf: StateBuffer | memoryview | bytes | bytearray) -> int:
        """Replace ``seq`` with a packed state and its stored logits; returns its length.

        The sequence is cleared first. ``llama_state_seq_set_data`` reads the
        state straight from ``buf``; the logits (4 * n_vocab bytes) are copied,
        so ``buf`` may be closed as soon as this returns. Raises
        CacheFormatError for a malformed buffer (strict header), another kind,
        another vocabulary size, a state llama.cpp rejects (``unpack_failed``,
        with its reason, e.g. a context with other ``ctx_params``) or restored
        positions that are not ``0..n-1`` (``state_mismatch``); the sequence is
        then left empty, never partial. ContextOverflowError if it cannot fit.
        """
        self._seq(seq)
        if isinstance(buf, StateBuffer):
            data: memoryview = buf.view()
        else:
            data = memoryview(buf).cast("B")
        h = parse_header(data)
        if h.kind != KIND_LLAMA:
            raise CacheFormatError("bad_kind", f"kind {h.kind} is not a llama.cpp state")
        if h.n_vocab != self._nv:
            raise CacheFormatError("vocab_mismatch", f"n_vocab {h.n_vocab}, model has {self._nv}")
        if h.n_tokens > self._info.n_ctx:
            raise ContextOverflowError(
                f"state of {h.n_tokens} tokens exceeds n_ctx {self._info.n_ctx}", self._info.name
            )
        if self._used_cells() - self._seqs[seq].n + h.n_tokens > self._info.kv_size:
            raise ContextOverflowError("the KV cache has no room for this state", self._info.name)
        logits = logits_of(data, h).copy() if h.has_logits else None
        addr, keep = buffer_address(buf if isinstance(buf, StateBuffer) else data)
        self._clear(seq)
        src = ctypes.cast(addr + h.state_offset, ctypes.POINTER(ctypes.c_uint8))
        with llama_log.capture() as cap:
            read = int(_L.llama_state_seq_set_data(self._ctx, src, h.state_len, seq))
        del keep
        if read != h.state_len:
            self._clear(seq)
            raise CacheFormatError(
                "unpack_failed",
                f"llama_state_seq_set_data read {read} of {h.state_len} bytes"
                f"{': ' + cap.summary() if cap.lines else ''}",
            )
        n = h.n_tokens
        pos_min = int(_L.llama_memory_seq_pos_min(self._mem, seq))
        pos_max = int(_L.llama_memory_seq_pos_max(self._mem, seq))
        n_swa = self._info.n_swa
        want_min = max(0, n - n_swa) if n_swa > 0 else 0
        ok = (pos_max == -1) if n == 0 else (pos_max == n - 1 and 0 <= pos_min <= want_min)
        if not ok:
            self._clear(seq)
            raise CacheFormatError(
                "state_mismatch",
                f"restored positions {pos_min}..{pos_max}, header says {n} tokens",
            )
        st = self._seqs[seq]
        st.n = n
        st.row = None
        st.logits = logits
        return n

    # ------------------------------------------------------------------ embed

    @_api
    def embed(self, tokens: Sequence[int]) -> list[float]:
        """Mean-pooled last-layer embedding of ``tokens`` (``n_embd`` floats).

        Runs in a second, small context (created on first use, ``n_batch``
        cells, embeddings on, mean pooling) so that it never touches the
        sequences of the main one. At most ``n_batch`` tokens.
        """
        toks = self._token_array(tokens)
        nb = self._info.n_batch
        if len(toks) > nb:
            raise InvalidRequestError(f"{len(toks)} tokens exceed n_batch {nb}", param="tokens")
        if self._embed_ctx is None:
            cp = _L.llama_context_default_params()
            cp.n_ctx = nb
            cp.n_batch = nb
            cp.n_ubatch = nb
            cp.n_seq_max = 1
            cp.n_threads = self._n_threads
            cp.n_threads_batch = self._n_threads
            cp.embeddings = True
            cp.pooling_type = _POOLING_MEAN
            cp.flash_attn_type = 1 if self._flash_attn else 0
            cp.no_perf = True
            with llama_log.capture() as cap:
                ectx = _L.llama_init_from_model(self._model, cp)
            if not ectx:
                raise ModelError(f"cannot create an embedding context: {cap.summary()}")
            self._embed_ctx = ectx
        ectx = self._embed_ctx
        _L.llama_memory_clear(_L.llama_get_memory(ectx), True)
        n = len(toks)
        self._b_token[:n] = toks
        self._b_pos[:n] = np.arange(n, dtype=np.int32)
        self._b_nseq[:n] = 1
        self._b_logits[:n] = 1
        for j in range(n):
            self._b_sid[j][0] = 0
        self._batch.n_tokens = n
        rc = int(_L.llama_decode(ectx, self._batch))
        if rc != 0:
            raise ModelError(f"embedding decode failed with status {rc}", self._info.name)
        ptr = _L.llama_get_embeddings_seq(ectx, 0)
        if not ptr:
            ptr = _L.llama_get_embeddings_ith(ectx, -1)
        if not ptr:
            raise ModelError("llama.cpp returned no embedding", self._info.name)
        n_embd = self._info.n_embd
        return [float(x) for x in np.ctypeslib.as_array(ptr, shape=(n_embd,))]

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Free samplers, batch, contexts and model (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._samplers.close()
            _L.llama_batch_free(self._batch)
            if self._embed_ctx is not None:
                _L.llama_free(self._embed_ctx)
                self._embed_ctx = None
            _L.llama_free(self._ctx)
            _L.llama_model_free(self._model)
            self._seqs = []

    def __enter__(self) -> LlamaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_training_context(n_ctx: int, n_ctx_train: int) -> None:
    """Refuse a context longer than the model was trained for.

    Past its training context a model without rope scaling produces garbage, and
    llama.cpp only logs a warning; we refuse at load, with the limit in the message,
    rather than clamp in silence (the caller asked for more room than it would get).
    """
    if 0 < n_ctx_train < n_ctx:
        raise ConfigError(
            "n_ctx",
            f"{n_ctx} is past the model's training context of {n_ctx_train} tokens; "
            f"use n_ctx <= {n_ctx_train}",
        )


def _validate_options(
    *,
    n_ctx: int,
    n_batch: int,
    n_seq_max: int,
    n_threads: int | None,
    n_ubatch: int | None,
    kv_size: int | None,
    type_k: str,
    type_v: str,
) -> None:
    def pos_int(key: str, v: object) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(key, f"must be a positive integer, got {v!r}")

    pos_int("n_ctx", n_ctx)
    pos_int("n_batch", n_batch)
    pos_int("n_seq_max", n_seq_max)
    if n_threads is not None:
        pos_int("n_threads", n_threads)
    if n_ubatch is not None:
        pos_int("n_ubatch", n_ubatch)
        if n_ubatch > n_batch:
            raise ConfigError("n_ubatch", f"must be <= n_batch {n_batch}, got {n_ubatch}")
    if kv_size is not None:
        pos_int("kv_size", kv_size)
    max_seq = int(_L.llama_max_parallel_sequences())
    if n_seq_max > max_seq:
        raise ConfigError("n_seq_max", f"must be <= {max_seq}, got {n_seq_max}")
    for key, t in (("type_k", type_k), ("type_v", type_v)):
        if t not in KV_TYPES:
            raise ConfigError(key, f"must be one of {sorted(KV_TYPES)}, got {t!r}")
