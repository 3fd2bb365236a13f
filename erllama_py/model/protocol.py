"""The context worker protocol: commands, replies, and how errors cross the boundary.

The runtime sends one command and waits for its reply; the worker runs one
command at a time. Messages are pickled frames on the `supervisors.Channel`
between them. A KV state never travels in a frame: it stays in a memfd
(`StateBuffer`) whose descriptor crosses with ``SCM_RIGHTS`` right after the
frame that announces it (`Pack`'s reply, `Unpack`'s command), so a state of
hundreds of megabytes costs a descriptor, not a copy.

Errors raised by the backend are sent as (class name, message, param) and
rebuilt on the runtime side by `raise_remote`, the one place that maps worker
errors onto the `ModelError` family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from erllama_py.errors import (
    ContextOverflowError,
    InvalidRequestError,
    ModelError,
    ModelLoadError,
)

__all__ = [
    "ChatTemplate",
    "ClearSeq",
    "Command",
    "Detokenize",
    "Embed",
    "FreeSampler",
    "NewSampler",
    "Pack",
    "Reset",
    "SeqLen",
    "Step",
    "StepOp",
    "Tokenize",
    "Truncate",
    "Unpack",
    "WorkerSpec",
    "raise_remote",
]

FD_MARK = b"F"  # the one byte that carries descriptors after an announcing frame


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
    stub: Mapping[str, Any] = field(default_factory=dict)

    def log_file(self) -> Path | None:
        return Path(self.log_path) if self.log_path else None


@dataclass(frozen=True)
class Tokenize:
    text: str
    add_special: bool = True
    parse_special: bool = False


@dataclass(frozen=True)
class Detokenize:
    tokens: Sequence[int]
    special: bool = False


@dataclass(frozen=True)
class ChatTemplate:
    messages: Sequence[Mapping[str, Any]]
    add_generation_prompt: bool = True
    template: str | None = None


@dataclass(frozen=True)
class NewSampler:
    config: Mapping[str, Any]
    history: Sequence[int] = ()


@dataclass(frozen=True)
class FreeSampler:
    sampler: int


StepOp = tuple[Any, ...]
"""``("prefill", seq, tokens)`` or ``("gen", seq, sampler, pending token or None)``,
where ``sampler`` is an id, or ``(config, history)`` to create one with this step (its
id then comes back as a fourth item of the op's result)."""


@dataclass(frozen=True)
class Step:
    """One tick. The reply lists, per op, None (prefill) or (token, eog, piece bytes)."""

    ops: Sequence[StepOp]


@dataclass(frozen=True)
class Pack:
    """Save a sequence; the reply frame is followed by the buffer's descriptor.

    ``canonical``: continue from the saved state itself (see `Backend.pack`).
    """

    seq: int
    canonical: bool = False


@dataclass(frozen=True)
class Unpack:
    """Restore a sequence from the buffer whose descriptor follows this frame."""

    seq: int
    size: int


@dataclass(frozen=True)
class Truncate:
    seq: int
    n: int


@dataclass(frozen=True)
class ClearSeq:
    seq: int


@dataclass(frozen=True)
class SeqLen:
    seq: int


@dataclass(frozen=True)
class Embed:
    tokens: Sequence[int]


@dataclass(frozen=True)
class Reset:
    """Clear every sequence and free every sampler (a new model actor took over)."""


Command = (
    Tokenize
    | Detokenize
    | ChatTemplate
    | NewSampler
    | FreeSampler
    | Step
    | Pack
    | Unpack
    | Truncate
    | ClearSeq
    | SeqLen
    | Embed
    | Reset
)

_REMOTE_ERRORS: dict[str, type[ModelError]] = {
    "InvalidRequestError": InvalidRequestError,
    "ContextOverflowError": ContextOverflowError,
    "ModelLoadError": ModelLoadError,
}


def raise_remote(model: str, kind: str, message: str, param: str | None) -> NoReturn:
    """Re-raise a worker-side error as the matching `ModelError` subclass."""
    cls = _REMOTE_ERRORS.get(kind)
    if cls is InvalidRequestError or cls is ContextOverflowError:
        raise cls(message, model, param=param)
    if cls is ModelLoadError:
        raise ModelLoadError(message, model)
    raise ModelError(f"worker error ({kind}): {message}", model)
