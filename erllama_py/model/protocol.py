"""The context worker protocol: typed commands, typed replies, and how errors cross.

The runtime sends one `Command` and waits for its `Reply`; the worker runs one
command at a time. Messages are pickled dataclasses on the
`supervisors.Channel` between them. Each command class names the type of its
reply's value (``Tokenize`` is a ``Command[list[int]]``), so that
`WorkerClient.call` is typed end to end.

A KV state never travels in a frame: it stays in shared memory. A `Pack`
writes into a slot of the runtime's arena (`erllama_py.model.arena`): the
worker answers `SlotWanted` (the packed size), the runtime grants a slot
(`SlotGranted`, naming a segment, offset and size) and the worker packs
straight into its mapping of that segment, then answers `Ok` (the size). An
`Unpack` names an arena slot the same way, or announces a standalone buffer
(`slot` None) whose memfd follows; when the runtime checks the payload while
the worker restores, its `Verdict` follows as one more frame. A segment's
descriptor crosses with ``SCM_RIGHTS`` right after the frame that first names
it to this worker (``SlotRef.fd_follows``), so a state of hundreds of
megabytes costs neither a copy nor, after the first time, a descriptor.

The handshake: a new worker sends `Ready` (its model's `BackendInfo`) or
`LoadFailed` (why it could not load).

Errors raised by the backend travel as `Failed` (class name, message, param)
and are rebuilt on the runtime side by `raise_remote`, the one place that
maps worker errors onto the `ModelError` family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, NoReturn, TypeVar

from erllama_py.errors import (
    CacheFormatError,
    ContextOverflowError,
    InvalidRequestError,
    ModelError,
    ModelLoadError,
)
from erllama_py.model.arena import SlotRef
from erllama_py.model.backend import BackendInfo, Prefill
from erllama_py.params import ChatMessage, SamplingParams, Tool

__all__ = [
    "FD_MARK",
    "ChatTemplate",
    "ClearSeq",
    "Command",
    "Detokenize",
    "Embed",
    "Failed",
    "FreeSampler",
    "GenerateOp",
    "LoadFailed",
    "MoveSeq",
    "NewSampler",
    "Ok",
    "Pack",
    "Prefill",
    "Ready",
    "Reply",
    "Reset",
    "SamplerSpec",
    "SeqLen",
    "SlotGranted",
    "SlotRefused",
    "SlotWanted",
    "Step",
    "StepOp",
    "TokenOut",
    "Tokenize",
    "Truncate",
    "Unpack",
    "Unpacked",
    "Verdict",
    "WorkerSpec",
    "raise_remote",
]

FD_MARK = b"F"  # the one byte that carries descriptors after an announcing frame
R_co = TypeVar("R_co", covariant=True)


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a context worker (pickled into the new process)."""

    model: str
    backend: str = "llama"
    model_path: str | None = None
    n_ctx: int = 4096
    n_batch: int = 512
    n_seq_max: int = 4
    n_threads: int | None = None
    log_path: str | None = None
    stub: Mapping[str, int | float] = field(default_factory=dict)

    def log_file(self) -> Path | None:
        return Path(self.log_path) if self.log_path else None


# ---------------------------------------------------------------------- handshake


@dataclass(frozen=True)
class Ready:
    """The worker loaded its model."""

    info: BackendInfo


@dataclass(frozen=True)
class LoadFailed:
    """The worker could not load its model (it exits after sending this)."""

    reason: str


# ---------------------------------------------------------------------- commands


class Command(Generic[R_co]):
    """A command to a context worker; ``R_co`` is the type of its reply's value."""

    __slots__ = ()


@dataclass(frozen=True)
class Tokenize(Command[list[int]]):
    text: str
    add_special: bool = True
    parse_special: bool = False


@dataclass(frozen=True)
class Detokenize(Command[bytes]):
    tokens: Sequence[int]
    special: bool = False


@dataclass(frozen=True)
class ChatTemplate(Command[str]):
    """Render a conversation to prompt text."""

    messages: Sequence[ChatMessage]
    add_generation_prompt: bool = True
    template: str | None = None
    tools: Sequence[Tool] | None = None


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler to create: its parameters and the context that primes its penalties."""

    params: SamplingParams
    history: Sequence[int] = ()


@dataclass(frozen=True)
class NewSampler(Command[int]):
    """Create a sampler; the reply is its id."""

    spec: SamplerSpec


@dataclass(frozen=True)
class FreeSampler(Command[None]):
    sampler: int


@dataclass(frozen=True)
class GenerateOp:
    """Decode ``pending`` (the token sampled last tick, if any) into ``seq``, then sample
    the next token with ``sampler``: an id, or a `SamplerSpec` to create it with this
    step (its id then comes back in the op's `TokenOut`)."""

    seq: int
    sampler: int | SamplerSpec
    pending: int | None = None
    logprobs: int | None = None


StepOp = Prefill | GenerateOp


@dataclass(frozen=True)
class TokenOut:
    """What a `GenerateOp` produced: the token, whether it ends generation, its bytes
    (empty for an end-of-generation token), and the id of a sampler created for it."""

    token: int
    eog: bool
    piece: bytes
    sampler: int | None = None
    logprob: float | None = None
    top: tuple[tuple[int, float, bytes], ...] = ()
    """The most likely tokens when log-probabilities were asked for: (id, logprob, bytes)."""


@dataclass(frozen=True)
class Step(Command[list[TokenOut | None]]):
    """One tick, in one ``llama_decode``. The reply has one item per op, in op order:
    None for a `Prefill`, a `TokenOut` for a `GenerateOp`."""

    ops: Sequence[StepOp]


@dataclass(frozen=True)
class Pack(Command[int]):
    """Save a sequence into an arena slot: the worker replies `SlotWanted`, is sent
    `SlotGranted` (or `SlotRefused`), packs, and replies `Ok` with the size.

    ``canonical``: continue from the saved state itself (see `Backend.pack`).
    """

    seq: int
    canonical: bool = False


@dataclass(frozen=True)
class SlotGranted:
    """The runtime's answer to `SlotWanted`: pack into this slot."""

    slot: SlotRef


@dataclass(frozen=True)
class SlotRefused:
    """The runtime's answer to `SlotWanted` when it has no room: the pack fails."""

    reason: str


@dataclass(frozen=True)
class Unpacked:
    """What an `Unpack` did: the tokens restored, whether the runtime's check of the
    payload passed (False: the sequence was cleared and nothing sampled), and the token
    `then` sampled."""

    n_tokens: int
    verified: bool = True
    first: TokenOut | None = None


@dataclass(frozen=True)
class Unpack(Command[Unpacked]):
    """Restore a sequence from an arena slot (`slot`), or from the standalone buffer whose
    descriptor follows this frame (`slot` None).

    With `verdict_follows` the runtime checks the payload (its checksum) while the
    worker restores from it, and sends a `Verdict` after the frame (and descriptor);
    the worker reads it before it answers, whatever happened, and clears the sequence
    if it says no. With `then` (a `GenerateOp` on `seq` with nothing pending) it
    samples the first token from the restored logits in the same call, once the
    verdict is in: an exact hit costs one round trip to its first token, and no token
    is ever sampled from a state whose bytes were not checked.
    """

    seq: int
    size: int
    slot: SlotRef | None = None
    verdict_follows: bool = False
    then: GenerateOp | None = None


@dataclass(frozen=True)
class Verdict:
    """The runtime's check of the payload of the `Unpack` before it (``verdict_follows``)."""

    verified: bool


@dataclass(frozen=True)
class Truncate(Command[bool]):
    seq: int
    n: int


@dataclass(frozen=True)
class ClearSeq(Command[None]):
    seq: int


@dataclass(frozen=True)
class MoveSeq(Command[None]):
    """Move a sequence's state to an empty sequence (see ``Backend.move_seq``)."""

    src: int
    dst: int


@dataclass(frozen=True)
class SeqLen(Command[int]):
    seq: int


@dataclass(frozen=True)
class Embed(Command[list[float]]):
    tokens: Sequence[int]


@dataclass(frozen=True)
class Reset(Command[None]):
    """Clear every sequence and free every sampler (a new model actor took over)."""


# ---------------------------------------------------------------------- replies


@dataclass(frozen=True)
class Ok:
    """A command succeeded; ``value`` has the type its command names."""

    value: object


@dataclass(frozen=True)
class SlotWanted:
    """The worker's first reply to `Pack`: the packed state needs ``size`` bytes."""

    size: int


@dataclass(frozen=True)
class Failed:
    """A command failed: the error's class name, message and parameter."""

    kind: str
    message: str
    param: str | None = None
    reason: str | None = None  # a CacheFormatError's tag
    errno: int | None = None  # an OSError's errno (a pack that could not get memory)


Reply = Ok | SlotWanted | Failed

_REMOTE_ERRORS: dict[str, type[ModelError]] = {
    "InvalidRequestError": InvalidRequestError,
    "ContextOverflowError": ContextOverflowError,
    "ModelLoadError": ModelLoadError,
}


def raise_remote(model: str, failed: Failed) -> NoReturn:
    """Re-raise a worker-side error as the matching erllama-py error."""
    if failed.kind == "CacheFormatError":
        raise CacheFormatError(failed.reason or "unpack_failed", failed.message)
    cls = _REMOTE_ERRORS.get(failed.kind)
    if cls is InvalidRequestError or cls is ContextOverflowError:
        raise cls(failed.message, model, param=failed.param)
    if cls is ModelLoadError:
        raise ModelLoadError(failed.message, model)
    raise ModelError(f"worker error ({failed.kind}): {failed.message}", model)
