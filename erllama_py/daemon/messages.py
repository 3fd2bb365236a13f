"""The control socket's messages: typed requests and replies, and their framing.

One connection carries any number of request/reply exchanges, one at a time. Each
message is a frame::

    offset  size  field
    0       4     length of the body in bytes, unsigned big-endian (at most MAX_FRAME)
    4       n     body: a msgpack map {"v": VERSION, "type": <tag>, <field>: <value>, ...}

The tag names the dataclass below; the other keys are its fields (nested dataclasses as
maps). A peer that sends another version, an unknown tag, unknown or missing fields, or a
frame over `MAX_FRAME` gets an `ErrorReply` and the connection is closed.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from erllama_py.params import JSON

__all__ = [
    "MAX_FRAME",
    "VERSION",
    "CacheCheckReply",
    "CacheCheckRequest",
    "CacheGcReply",
    "CacheGcRequest",
    "ChildReply",
    "ChildRequest",
    "CountersReply",
    "CountersRequest",
    "ErrorReply",
    "KillReply",
    "KillRequest",
    "Message",
    "ModelSummary",
    "ModelsReply",
    "ModelsRequest",
    "ProtocolError",
    "Reply",
    "Request",
    "RestartReply",
    "RestartRequest",
    "RowsReply",
    "RowsRequest",
    "StatusReply",
    "StatusRequest",
    "TierSummary",
    "TreeReply",
    "TreeRequest",
    "decode",
    "encode",
    "recv_message",
    "send_message",
]

VERSION = 1
MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame or a message that does not follow this module's format."""


class Message:
    """Base of every message; `tag` is its ``type`` on the wire."""

    tag: ClassVar[str] = ""

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Message:
        return cls(**fields)


class Request(Message):
    """A request from a client."""


class Reply(Message):
    """The daemon's answer to one request."""


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class StatusRequest(Request):
    """What `erllama-py daemon status` prints."""

    tag: ClassVar[str] = "status"


@dataclass(frozen=True)
class TreeRequest(Request):
    """The live supervision tree (a `supervisors.TreeNode`)."""

    tag: ClassVar[str] = "tree"


@dataclass(frozen=True)
class ChildRequest(Request):
    """One node of the tree, found by registry name or id."""

    tag: ClassVar[str] = "child"
    name: str


@dataclass(frozen=True)
class ModelsRequest(Request):
    """Every loaded model's info (``ModelInfo.to_dict()``)."""

    tag: ClassVar[str] = "models"


@dataclass(frozen=True)
class CountersRequest(Request):
    """The cache counters (``CounterSnapshot.to_dict()``)."""

    tag: ClassVar[str] = "counters"


@dataclass(frozen=True)
class RowsRequest(Request):
    """The cache rows, of one tier (by name or kind) or of all."""

    tag: ClassVar[str] = "rows"
    tier: str | None = None


@dataclass(frozen=True)
class CacheCheckRequest(Request):
    """Cross-examine the cache index and its tiers."""

    tag: ClassVar[str] = "cache_check"


@dataclass(frozen=True)
class CacheGcRequest(Request):
    """Evict every unpinned row."""

    tag: ClassVar[str] = "cache_gc"


@dataclass(frozen=True)
class KillRequest(Request):
    """Crash a child: SIGKILL for a process, a failure for an actor."""

    tag: ClassVar[str] = "kill"
    name: str


@dataclass(frozen=True)
class RestartRequest(Request):
    """Terminate a child and start it again (through its supervisor)."""

    tag: ClassVar[str] = "restart"
    name: str


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class ModelSummary:
    """One model in a status."""

    name: str
    status: str
    phase: str
    active: int
    queued: int
    worker_pid: int | None
    worker_state: str
    worker_restarts: int


@dataclass(frozen=True)
class TierSummary:
    """One cache tier in a status."""

    name: str
    kind: str
    rows: int
    bytes: int
    quota_bytes: int


@dataclass(frozen=True)
class StatusReply(Reply):
    tag: ClassVar[str] = "status_reply"
    pid: int
    started_at: float
    uptime_s: float
    url: str | None
    ready: bool
    models: list[ModelSummary] = field(default_factory=list)
    tiers: list[TierSummary] = field(default_factory=list)
    worker_restarts: int = 0

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Message:
        models = [ModelSummary(**m) for m in fields.pop("models", [])]
        tiers = [TierSummary(**t) for t in fields.pop("tiers", [])]
        return cls(models=models, tiers=tiers, **fields)

    def to_dict(self) -> dict[str, JSON]:
        out: dict[str, JSON] = _fields(self)
        return out


@dataclass(frozen=True)
class TreeReply(Reply):
    tag: ClassVar[str] = "tree_reply"
    tree: dict[str, Any]


@dataclass(frozen=True)
class ChildReply(Reply):
    """`node` is None when no child has that name."""

    tag: ClassVar[str] = "child_reply"
    name: str
    node: dict[str, Any] | None


@dataclass(frozen=True)
class ModelsReply(Reply):
    tag: ClassVar[str] = "models_reply"
    models: list[dict[str, Any]]


@dataclass(frozen=True)
class CountersReply(Reply):
    tag: ClassVar[str] = "counters_reply"
    counters: dict[str, Any]


@dataclass(frozen=True)
class RowsReply(Reply):
    tag: ClassVar[str] = "rows_reply"
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class CacheCheckReply(Reply):
    """One line per problem; empty when the cache is sound."""

    tag: ClassVar[str] = "cache_check_reply"
    problems: list[str]


@dataclass(frozen=True)
class CacheGcReply(Reply):
    tag: ClassVar[str] = "cache_gc_reply"
    evicted: int


@dataclass(frozen=True)
class KillReply(Reply):
    """The instance killed: its pid (a process) or thread (an actor), and the child's
    restart count before the kill."""

    tag: ClassVar[str] = "kill_reply"
    name: str
    kind: str
    pid: int | None
    thread: str | None
    restarts: int


@dataclass(frozen=True)
class RestartReply(Reply):
    """The child's node after the restart."""

    tag: ClassVar[str] = "restart_reply"
    name: str
    node: dict[str, Any] | None


@dataclass(frozen=True)
class ErrorReply(Reply):
    """A refused or failed request: `kind` is the error's class name."""

    tag: ClassVar[str] = "error"
    kind: str
    message: str


_TYPES: dict[str, type[Message]] = {
    cls.tag: cls
    for cls in (
        StatusRequest, TreeRequest, ChildRequest, ModelsRequest, CountersRequest, RowsRequest,
        CacheCheckRequest, CacheGcRequest, KillRequest, RestartRequest,
        StatusReply, TreeReply, ChildReply, ModelsReply, CountersReply, RowsReply,
        CacheCheckReply, CacheGcReply, KillReply, RestartReply, ErrorReply,
    )
}  # fmt: skip


def _fields(message: object) -> dict[str, Any]:
    assert dataclasses.is_dataclass(message)
    assert not isinstance(message, type)
    return dataclasses.asdict(message)


def encode(message: Message) -> bytes:
    """The body of a frame (without its length header)."""
    body = {"v": VERSION, "type": message.tag, **_fields(message)}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode(body: bytes) -> Message:
    """Parse a frame's body.

    Raises:
        ProtocolError: not msgpack, another version, an unknown type, or bad fields.
    """
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"not a msgpack message: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError("a message must be a msgpack map")
    version = raw.pop("v", None)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r} is not {VERSION}")
    cls = _TYPES.get(str(raw.pop("type", "")))
    if cls is None:
        raise ProtocolError(f"unknown message type in {sorted(raw)}")
    try:
        return cls.from_fields(raw)
    except TypeError as exc:
        raise ProtocolError(f"bad fields for {cls.tag}: {exc}") from exc


def send_message(sock: socket.socket, message: Message) -> None:
    """Write one frame."""
    body = encode(message)
    sock.sendall(_HEADER.pack(len(body)) + body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            if chunks:
                raise ProtocolError("the connection closed inside a frame")
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> Message | None:
    """Read one frame; None if the peer closed the connection between frames.

    Raises:
        ProtocolError: a truncated or oversized frame, or a bad message.
    """
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"a frame of {length} bytes is over {MAX_FRAME}")
    body = _recv_exactly(sock, length) if length else b""
    if body is None:
        raise ProtocolError("the connection closed inside a frame")
    return decode(body)
