"""The in-worker inference backend protocol and its value types.

A context worker process owns one :class:`Backend` (llama.cpp's
:class:`~erllama_py.model.llama_backend.LlamaBackend`, or the deterministic
:class:`~erllama_py.model.stub_backend.StubBackend`) and executes the
runtime's commands on it. Methods are coarse so that one IPC round trip per
scheduler tick suffices: :meth:`Backend.step` runs every sequence's prefill
slice and decode of a tick in one ``llama_decode``.

Sequences (``seq`` in ``[0, n_seq_max)``) are KV-cache slots. Each has a
length (its next position) and, after a prefill or decode, *current logits*:
the distribution of its next token. A :class:`Decode` samples from them, so a
sequence without logits cannot be decoded (``InvalidRequestError``, checked
before llama.cpp is called).

Value types are frozen dataclasses or named tuples of plain values, so that
they can be framed with msgpack/JSON by the worker protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from erllama_py.errors import ContextOverflowError, InvalidRequestError
from erllama_py.model.statebuf import Allocate, PackTarget, StateBuffer
from erllama_py.params import SamplingParams

__all__ = [
    "Backend",
    "CheckedOp",
    "Decode",
    "Generate",
    "BackendInfo",
    "Op",
    "Prefill",
    "Sampled",
    "StepResult",
    "check_move",
    "check_step",
    "validate_messages",
    "validate_seq",
    "validate_tokens",
]


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a loaded model and its context are; JSON-serialisable via :meth:`to_dict`.

    ``n_ctx`` is the per-sequence limit: positions are ``< n_ctx``. ``n_batch``
    is the most tokens one step may carry, ``n_ubatch`` llama.cpp's physical
    batch (it changes numerics, not state layout). ``kv_size`` is the number of
    KV cells of the context: with a unified KV cache all sequences share them
    (the sum of sequence lengths stays ``<= kv_size``).

    ``fingerprint`` (32 bytes) identifies the GGUF file cheaply but soundly:
    ``sha256(b"erllama-gguf-fp-v1" || u64le(file size) || file[0:data_offset]
    || first MiB || last MiB)`` where ``data_offset`` is where the tensor data
    starts (so the whole header, metadata and tensor table are covered); with
    ``full_fingerprint`` it is ``sha256(b"erllama-gguf-full-v1" || file)``.

    ``ctx_params`` holds the context parameters a saved sequence state
    depends on (see the backend's docs for which matter, as measured).
    """

    backend: str
    name: str
    description: str
    architecture: str
    quant: str
    file_size: int
    fingerprint: bytes
    n_vocab: int
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_seq_max: int
    kv_size: int
    n_swa: int
    n_ctx_train: int
    n_embd: int
    bos: int | None
    add_bos: bool
    eos: int | None
    eog: tuple[int, ...]
    add_space_prefix: bool
    chat_template: str | None
    chat_template_fallback: str | None
    ctx_params: Mapping[str, Any] = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``fingerprint`` as hex, tuples as lists)."""
        d = asdict(self)
        d["fingerprint"] = self.fingerprint.hex()
        d["eog"] = list(self.eog)
        d["ctx_params"] = dict(self.ctx_params)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackendInfo:
        """Inverse of :meth:`to_dict`."""
        kw = dict(d)
        kw["fingerprint"] = bytes.fromhex(kw["fingerprint"])
        kw["eog"] = tuple(kw["eog"])
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class Prefill:
    """Append ``tokens`` to ``seq`` at its next positions.

    Logits are requested for the last token only and become the sequence's
    current logits. Its result is ``None``.
    """

    seq: int
    tokens: Sequence[int]


@dataclass(frozen=True, slots=True)
class Decode:
    """Sample a token for ``seq`` from its current logits with ``sampler``, then decode it.

    When :meth:`Backend.step` returns, the token is in the KV cache and the
    sequence's logits are those after it; an end-of-generation token is
    reported (``eog=True``) but not decoded, and the logits stay. Its result
    is a :class:`Sampled`.
    """

    seq: int
    sampler: int


@dataclass(frozen=True, slots=True)
class Generate:
    """Decode ``pending`` (the token sampled last time, if any), then sample the next one.

    This is how the runtime generates: a sampled token is decoded only when
    generation goes on, so the first token after a prefill or a restore costs
    no decode (it is sampled from the current logits) and the last token of a
    request is never decoded. With ``pending``, the token goes into this
    step's batch and the next token is sampled from the logits after it (at
    position ``seq_len``); without, the token is sampled from the current
    logits. Its result is a :class:`Sampled`; an end-of-generation token is
    only reported.
    """

    seq: int
    sampler: int
    pending: int | None = None
    logprobs: int | None = None
    """Also report the sampled token's log-probability and the ``logprobs`` most likely
    tokens' (0: the sampled one only); None: no log-probabilities."""


Op = Prefill | Decode | Generate


class Sampled(NamedTuple):
    """The result of a :class:`Decode` or `Generate`: the token, whether it ends
    generation and, when asked for, its log-probability under the model's distribution
    (before any sampler) and the most likely tokens' ``(token, logprob)``, best first."""

    token: int
    eog: bool
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def log_softmax_top(
    logits: np.ndarray, token: int, n_top: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log-probability of `token` under softmax(`logits`) and the `n_top` most likely
    tokens with theirs, best first (ties by token id)."""
    peak = float(np.max(logits))
    lse = peak + float(np.log(np.sum(np.exp(logits - peak, dtype=np.float64))))
    chosen = float(logits[token]) - lse
    if n_top <= 0:
        return chosen, ()
    n_top = min(n_top, len(logits))
    idx = np.argpartition(-logits, n_top - 1)[:n_top]
    idx = idx[np.lexsort((idx, -logits[idx]))]
    return chosen, tuple((int(i), float(logits[i]) - lse) for i in idx)


StepResult = Sampled | None


@runtime_checkable
class Backend(Protocol):
    """What a context worker runs. Implementations: llama.cpp and a stub.

    Every method raises :class:`~erllama_py.errors.InvalidRequestError` for bad
    arguments (unknown sequence or sampler, token id outside the vocabulary,
    ...) before touching the model, and
    :class:`~erllama_py.errors.ContextOverflowError` when positions would
    reach ``n_ctx`` (or a unified KV cache would overflow).
    """

    @property
    def info(self) -> BackendInfo:
        """The model and context description."""
        ...

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS (if the model wants it),
        ``parse_special`` turns the text of special tokens into those tokens."""
        ...

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """The concatenated pieces of ``tokens`` as bytes (may end inside a UTF-8
        character); special tokens render empty unless ``special``."""
        ...

    def token_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (``detokenize([t])``)."""
        ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render chat ``messages`` (``{"role": str, "content": str}``, plus OpenAI's
        ``tool_calls`` / ``tool_call_id``) and ``tools`` to a prompt."""
        ...

    def new_sampler(
        self, cfg: SamplingParams | Mapping[str, Any], history: Sequence[int] = ()
    ) -> int:
        """Create a sampler (a mapping goes through :meth:`SamplingParams.from_dict`);
        ``history`` (the sequence's context so far, prompt included) primes the
        repetition penalty window. Returns its id."""
        ...

    def prime_sampler(self, sampler: int, tokens: Sequence[int]) -> None:
        """Feed ``tokens`` to the sampler's repetition-penalty window only."""
        ...

    def free_sampler(self, sampler: int) -> None:
        """Free a sampler (idempotent for ids this backend issued)."""
        ...

    def step(self, ops: Sequence[Op]) -> list[StepResult]:
        """Run one tick: every op in one batch; results in op order."""
        ...

    def seq_len(self, seq: int) -> int:
        """Number of positions held by ``seq`` (its next position)."""
        ...

    def seq_pos_min(self, seq: int) -> int:
        """Smallest position still held in the KV cache (-1 if empty)."""
        ...

    def has_logits(self, seq: int) -> bool:
        """Whether ``seq`` has current logits (a :class:`Decode` is allowed)."""
        ...

    def clear_seq(self, seq: int) -> None:
        """Drop every position of ``seq`` and its logits."""
        ...

    def move_seq(self, src: int, dst: int) -> None:
        """Move every position and the logits of ``src`` to the empty ``dst``, exactly
        (``src`` is empty afterwards). Raises InvalidRequestError if ``dst`` is in use
        or is ``src``."""
        ...

    def truncate(self, seq: int, n: int) -> bool:
        """Keep positions ``[0, n)``; False (and nothing changed) if that state
        cannot be produced exactly. Afterwards the seq has no logits, unless
        ``n`` equals its length."""
        ...

    def pack(self, seq: int, allow_no_logits: bool = False, canonical: bool = False) -> StateBuffer:
        """Save ``seq`` (state + last logits) into a new :class:`StateBuffer`.

        With ``canonical`` the sequence then continues from the saved state
        itself (restored in place), so that what it computes next is exactly
        what a restore of this state computes (see the llama backend).
        """
        ...

    def pack_into(
        self, seq: int, allocate: Allocate, allow_no_logits: bool = False, canonical: bool = False
    ) -> int:
        """`pack` into the place ``allocate(size)`` gives (an arena slot); returns the size.

        The target's view is released before this returns, also on failure.
        """
        ...

    def unpack(self, seq: int, buf: StateBuffer | memoryview | bytes | bytearray) -> int:
        """Replace ``seq`` with a packed state; returns the tokens restored."""
        ...

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """A pooled embedding of ``tokens``."""
        ...

    def close(self) -> None:
        """Free everything (idempotent)."""
        ...


class PackInto(Protocol):
    def __call__(
        self, seq: int, allocate: Allocate, allow_no_logits: bool = False, canonical: bool = False
    ) -> int: ...


def pack_to_new_buffer(
    pack_into: PackInto, seq: int, allow_no_logits: bool, canonical: bool
) -> StateBuffer:
    """`pack_into` a fresh shared buffer of exactly the state's size, sealed; closed on error."""
    made: list[StateBuffer] = []

    def fresh(size: int) -> PackTarget:
        made.append(StateBuffer.create(size))
        return made[0].target()

    try:
        pack_into(seq, fresh, allow_no_logits, canonical)
        made[0].seal()
    except BaseException:
        for buf in made:
            buf.close()
        raise
    return made[0]


def validate_tokens(tokens: Sequence[int], n_vocab: int, allow_empty: bool = False) -> np.ndarray:
    """Check a token list (vectorised) and return it as an int64 array.

    Raises :class:`InvalidRequestError` (``param="tokens"``) for an empty list
    (unless ``allow_empty``), non-integers, or an id outside ``[0, n_vocab)``:
    such ids abort or crash llama.cpp, so they never reach it.
    """
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"tokens must be a list of ints: {e}", param="tokens") from e
    if arr.size == 0:
        if allow_empty:
            return np.zeros(0, dtype=np.int64)
        raise InvalidRequestError("tokens must not be empty", param="tokens")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidRequestError("tokens must be a flat list of ints", param="tokens")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n_vocab:
        bad = lo if lo < 0 else hi
        raise InvalidRequestError(
            f"token id {bad} is outside the vocabulary [0, {n_vocab})", param="tokens"
        )
    return arr.astype(np.int64, copy=False)


def validate_seq(seq: int, n_seq_max: int) -> int:
    """Check a sequence id; raises :class:`InvalidRequestError` (``param="seq"``)."""
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < n_seq_max:
        raise InvalidRequestError(
            f"seq must be an int in [0, {n_seq_max}), got {seq!r}", param="seq"
        )
    return seq


@dataclass(frozen=True, slots=True)
class CheckedOp:
    """An op of a step after `check_step`: the tokens it feeds (None for a sample-only op)."""

    op: Op
    tokens: np.ndarray | None


def check_move(src: int, dst: int, dst_len: int) -> None:
    """Refuse a move onto the source itself or onto a sequence in use (both backends)."""
    if src == dst:
        raise InvalidRequestError(f"cannot move seq {src} onto itself", param="dst")
    if dst_len:
        raise InvalidRequestError(f"seq {dst} is in use ({dst_len} positions)", param="dst")


def check_step(
    ops: Sequence[object],
    info: BackendInfo,
    *,
    seq_len: Callable[[int], int],
    has_logits: Callable[[int], bool],
    check_sampler: Callable[[int], object],
    used_cells: int,
) -> list[CheckedOp]:
    """Validate every op of a step before anything runs; both backends call this.

    Checks seq ids (none twice), samplers, token ids, logits present where an op
    samples first, positions ``< n_ctx``, the batch ``<= n_batch`` and free KV
    cells. `seq_len`, `has_logits` and `check_sampler` read the backend's own
    state (they are called with valid seq ids only).

    Raises:
        InvalidRequestError, ContextOverflowError: nothing was changed.
    """
    checked: list[CheckedOp] = []
    seen: set[int] = set()
    total = 0
    n_ctx = info.n_ctx

    def need_logits(seq: int) -> None:
        if not has_logits(seq):
            raise InvalidRequestError(
                f"seq {seq} has no logits to sample from (prefill it first)", param="seq"
            )

    def full(seq: int) -> ContextOverflowError:
        return ContextOverflowError(
            f"seq {seq} is full ({seq_len(seq)} of n_ctx {n_ctx})", info.name
        )

    for op in ops:
        if isinstance(op, Prefill):
            n = seq_len(validate_seq(op.seq, info.n_seq_max))
            toks = validate_tokens(op.tokens, info.n_vocab)
            if n + len(toks) >= n_ctx:
                raise ContextOverflowError(
                    f"seq {op.seq}: {n} + {len(toks)} tokens leave no room in n_ctx {n_ctx}",
                    info.name,
                )
            total += len(toks)
            checked.append(CheckedOp(op, toks))
        elif isinstance(op, Generate):
            validate_seq(op.seq, info.n_seq_max)
            check_sampler(op.sampler)
            if op.pending is None:
                need_logits(op.seq)
                checked.append(CheckedOp(op, None))
            else:
                toks = validate_tokens([op.pending], info.n_vocab)
                if seq_len(op.seq) + 1 >= n_ctx:
                    raise full(op.seq)
                total += 1
                checked.append(CheckedOp(op, toks))
        elif isinstance(op, Decode):
            validate_seq(op.seq, info.n_seq_max)
            check_sampler(op.sampler)
            need_logits(op.seq)
            if seq_len(op.seq) >= n_ctx:
                raise full(op.seq)
            total += 1
            checked.append(CheckedOp(op, None))
        else:
            raise InvalidRequestError(f"unknown op {op!r}", param="ops")
        if op.seq in seen:
            raise InvalidRequestError(f"seq {op.seq} appears twice in one step", param="ops")
        seen.add(op.seq)
    if total > info.n_batch:
        raise InvalidRequestError(f"{total} tokens exceed n_batch {info.n_batch}", param="ops")
    if used_cells + total > info.kv_size:
        raise ContextOverflowError(
            f"the KV cache is full ({used_cells} + {total} > {info.kv_size} cells)", info.name
        )
    return checked


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Check chat messages and return ``(role, content)`` pairs.

    Each message needs a non-empty string ``role`` and a string ``content``
    (content blocks are refused) without NUL; raises
    :class:`InvalidRequestError` (``param="messages"``).
    """
    raw: object = messages
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence) or not raw:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a string", param="messages")
        if not isinstance(content, str):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string (content blocks are not supported)",
                param="messages",
            )
        if "\x00" in role or "\x00" in content:
            raise InvalidRequestError(f"messages[{i}] contains NUL", param="messages")
        out.append((role, content))
    return out
