"""The row file format (``.kvc``, version 1): framing and strict parsing.

One file holds one row: the tokens whose state is in the payload, the
namespace they were computed in, and the payload (the opaque state blob).
All integers are little-endian. The layout::

    Offset       Size         Type     Field
    0            4            bytes    magic b"EKVC"
    4            2            u16      version = 1
    6            1            u8       save_reason: 1 cold, 2 continued, 3 finish, 4 evict,
                                       5 shutdown
    7            1            u8       flags = 0 (no flag is defined in version 1)
    8            4            u32      hit_count: rewritten in place on every checkout
                                       (write_hit_count); excluded from both checksums
    12           4            u32      n_tokens
    16           4            u32      meta_len (at most MAX_META_LEN)
    20           4            u32      reserved = 0
    24           8            u64      payload_len
    32           8            u64      created, unix time in nanoseconds
    40           16           bytes    key: xxh3-128 of namespace prefix ‖ tokens (key.py)
    56           8            u64      payload_checksum: xxh3-64 of the payload
    64           8            u64      prefix_checksum: xxh3-64 of bytes 0..63 with
                                       hit_count read as 0, then the tokens, then the meta
    72           4·n_tokens   u32[]    tokens
    72+4n        meta_len     msgpack  meta: a map {"fingerprint": bin 32, "quant": str,
                                       "ctx_hash": bin 16, ...extras}
    72+4n+meta   payload_len  bytes    payload
    file size = 72 + 4·n_tokens + meta_len + payload_len, exactly

The header, tokens and meta form the *prefix*; it is built apart from the
payload so a writer can ``os.writev(fd, [prefix, payload])`` without ever
concatenating a large payload. The prefix checksum covers the payload
checksum field, so every byte of a file but the four of ``hit_count`` is
protected by one of the two checksums.

Version rule: any change to the layout or to the meaning of a field bumps
the version. A reader accepts exactly the versions it knows (only 1) and
rejects the rest: a row is a cache entry, so an unreadable one is dropped and
recomputed, never migrated. New meta keys need no bump: readers ignore keys
they do not know (they come back in :attr:`RowHeader.extras`).

The strict parser raises :class:`~erllama_py.errors.CacheFormatError`, never
a partial result, with one of these reasons: ``bad_magic``,
``unsupported_version``, ``bad_header`` (nonzero flags or reserved field,
meta_len over the cap), ``unknown_save_reason``, ``truncated`` (fewer bytes
than the header accounts for), ``trailing_bytes`` (more), ``checksum_mismatch``
(the detail says prefix or payload), ``bad_meta`` (not a msgpack map with a
valid namespace), ``key_mismatch`` (the key recomputed from the meta and the
tokens differs from the header's, or from the expected key).

Files are read with ``pread``/``preadv``, never mapped: a file truncated by
another process under a mapping would kill the reader with SIGBUS. Nothing
here goes through the meta actor.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias

import msgpack
import xxhash

from erllama_py.cache.key import (
    BytesLike,
    Namespace,
    TokenInput,
    decode_tokens,
    encode_tokens,
    make_key_encoded,
)
from erllama_py.errors import CacheFormatError, InvalidTokensError
from erllama_py.kinds import SaveReason

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "HIT_COUNT_OFFSET",
    "MAX_META_LEN",
    "FILE_SUFFIX",
    "REASON_BYTES",
    "save_reason",
    "SaveReason",
    "RowHeader",
    "Allocator",
    "build_prefix",
    "build_prefix_encoded",
    "parse_prefix",
    "parse",
    "check_payload",
    "read_file",
    "read_prefix_file",
    "write_hit_count",
]

MAGIC = b"EKVC"
FORMAT_VERSION = 1
HEADER_SIZE = 72  # bytes
HIT_COUNT_OFFSET = 8  # bytes; a u32 rewritten in place
MAX_META_LEN = 1 << 20  # 1 MiB; a larger meta_len is corruption, not data
FILE_SUFFIX = ".kvc"

_HEADER = struct.Struct("<4sHBBIIIIQQ16sQQ")
_HIT_COUNT = struct.Struct("<I")
_U32_MAX = 2**32 - 1
_NAMESPACE_KEYS = ("fingerprint", "quant", "ctx_hash")

Allocator: TypeAlias = Callable[[int], memoryview]
"""``allocate(n)`` returns a writable buffer of at least ``n`` bytes."""


REASON_BYTES: Mapping[SaveReason, int] = {
    SaveReason.COLD: 1,
    SaveReason.CONTINUED: 2,
    SaveReason.FINISH: 3,
    SaveReason.EVICT: 4,
    SaveReason.SHUTDOWN: 5,
}
"""The byte at offset 6 for each save reason (stable: part of the format)."""
_REASON_OF_BYTE = {byte: reason for reason, byte in REASON_BYTES.items()}


@dataclass(frozen=True, repr=False)
class RowHeader:
    """Everything in a row file but its payload, validated."""

    version: int
    reason: SaveReason
    flags: int
    hit_count: int
    """As read; the only field that changes after publication."""
    namespace: Namespace
    token_bytes: bytes
    """The tokens, u32 little-endian; see :attr:`tokens`."""
    created: int
    """Unix time in nanoseconds."""
    payload_len: int
    payload_offset: int
    """Where the payload starts; also the prefix's length."""
    key: bytes
    prefix_checksum: int
    payload_checksum: int
    extras: Mapping[str, Any] = field(hash=False)
    """Meta keys this version does not interpret (model name, hostname, ...)."""

    def __repr__(self) -> str:  # token lists run to 100 kB: show sizes, not bytes
        return (
            f"RowHeader(key={self.key.hex()}, reason={self.reason.value}, "
            f"n_tokens={self.n_tokens}, payload_len={self.payload_len}, "
            f"namespace={self.namespace.id}, hit_count={self.hit_count}, created={self.created})"
        )

    @property
    def n_tokens(self) -> int:
        """The number of tokens."""
        return len(self.token_bytes) // 4

    @cached_property
    def tokens(self) -> list[int]:
        """The tokens, decoded once on first access."""
        return decode_tokens(self.token_bytes)

    @property
    def file_size(self) -> int:
        """The exact size of the whole row: prefix plus payload."""
        return self.payload_offset + self.payload_len


class _Fixed(NamedTuple):
    """The fixed header's fields, checked for structure but not yet for checksums."""

    version: int
    reason: SaveReason
    flags: int
    hit_count: int
    n_tokens: int
    meta_len: int
    payload_len: int
    created: int
    key: bytes
    payload_checksum: int
    prefix_checksum: int

    @property
    def prefix_len(self) -> int:
        return HEADER_SIZE + 4 * self.n_tokens + self.meta_len

    @property
    def file_size(self) -> int:
        return self.prefix_len + self.payload_len


def _fail(reason: str, detail: str = "", path: str | None = None) -> CacheFormatError:
    return CacheFormatError(reason, detail, path)


def _flat(data: Any, what: str) -> memoryview:
    try:
        view = memoryview(data)
        if not view.c_contiguous:
            raise TypeError("not C-contiguous")
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError as exc:
        raise ValueError(f"{what}: must support the buffer protocol and be C-contiguous") from exc


# ---------------------------------------------------------------- writing


def save_reason(reason: SaveReason | str) -> SaveReason:
    """A save reason from its name.

    Raises:
        ValueError: no such reason.
    """
    if isinstance(reason, SaveReason):
        return reason
    try:
        return SaveReason(reason)
    except ValueError:
        names = ", ".join(r.value for r in SaveReason)
        raise ValueError(f"reason: must be one of {names}, got {reason!r}") from None


def _pack_meta(ns: Namespace, extra: Mapping[str, Any] | None) -> bytes:
    meta: dict[str, Any] = {
        "fingerprint": ns.fingerprint,
        "quant": ns.quant,
        "ctx_hash": ns.ctx_hash,
    }
    for name in sorted(extra or {}):
        if not isinstance(name, str) or name in _NAMESPACE_KEYS:
            raise ValueError(f"extra: key {name!r} is reserved or not a string")
        meta[name] = (extra or {})[name]
    try:
        packed = msgpack.packb(meta)
        _unpack_meta(packed)  # a row we write must be a row we can read
    except (TypeError, ValueError, CacheFormatError) as exc:
        raise ValueError(f"extra: not encodable as a readable msgpack map: {exc}") from exc
    if len(packed) > MAX_META_LEN:
        raise ValueError(f"extra: meta is {len(packed)} bytes, over {MAX_META_LEN}")
    return packed


def _prefix_checksum(header: BytesLike, token_bytes: BytesLike, meta: BytesLike) -> int:
    view = _flat(header, "header")
    hasher = xxhash.xxh3_64(view[:HIT_COUNT_OFFSET])
    hasher.update(bytes(_HIT_COUNT.size))
    hasher.update(view[HIT_COUNT_OFFSET + _HIT_COUNT.size : HEADER_SIZE - 8])
    hasher.update(token_bytes)
    hasher.update(meta)
    return hasher.intdigest()


def build_prefix(
    ns: Namespace,
    tokens: TokenInput,
    payload: Any,
    reason: SaveReason | str,
    *,
    created: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[bytes, bytes]:
    """Frame a row: return ``(prefix, key)`` for ``tokens`` and ``payload``.

    The prefix is the header, the tokens and the meta; write it followed by
    the payload (``os.writev(fd, [prefix, payload])``). ``payload`` is any
    C-contiguous buffer (bytes, bytearray, memoryview, mmap, numpy array); it
    is hashed in place, never copied. ``created`` defaults to now (unix ns);
    ``extra`` adds free-form msgpack-encodable meta keys (model name,
    hostname, version, ...).

    Raises:
        InvalidTokensError: as :func:`~erllama_py.cache.key.encode_tokens`.
        ValueError: ``reason`` is unknown, ``payload`` is not a contiguous
            buffer, ``extra`` uses a reserved key or does not encode, or
            ``created`` is outside u64.
    """
    return build_prefix_encoded(
        ns, encode_tokens(tokens), payload, reason, created=created, extra=extra
    )


def build_prefix_encoded(
    ns: Namespace,
    token_bytes: BytesLike,
    payload: Any,
    reason: SaveReason | str,
    *,
    created: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[bytes, bytes]:
    """:func:`build_prefix` for tokens already encoded as u32 little-endian.

    Raises:
        InvalidTokensError: ``token_bytes`` is not a multiple of 4 bytes or
            holds more than 2**32 - 1 tokens.
        ValueError: as :func:`build_prefix`.
    """
    tokens_view = _flat(token_bytes, "token_bytes")
    if tokens_view.nbytes % 4 or tokens_view.nbytes // 4 > _U32_MAX:
        raise InvalidTokensError(f"encoded tokens: bad length {tokens_view.nbytes} bytes")
    reason_value = save_reason(reason)
    created_ns = time.time_ns() if created is None else created
    if not 0 <= created_ns < 2**64:
        raise ValueError(f"created: must fit in u64 nanoseconds, got {created_ns}")
    body = _flat(payload, "payload")
    meta = _pack_meta(ns, extra)
    key = make_key_encoded(ns, tokens_view)
    fields: list[Any] = [
        MAGIC, FORMAT_VERSION, REASON_BYTES[reason_value], 0, 0, tokens_view.nbytes // 4,
        len(meta), 0,
        body.nbytes, created_ns, key, xxhash.xxh3_64_intdigest(body), 0,
    ]  # fmt: skip
    fields[-1] = _prefix_checksum(_HEADER.pack(*fields), tokens_view, meta)
    return b"".join((_HEADER.pack(*fields), tokens_view, meta)), key


# ---------------------------------------------------------------- parsing


def _parse_fixed(head: memoryview, file_size: int | None, path: str | None) -> _Fixed:
    """Check the 72-byte header's structure and, if known, the file size."""
    have = min(len(head), len(MAGIC))
    if head[:have] != MAGIC[:have]:
        raise _fail("bad_magic", f"starts with {bytes(head[:have])!r}", path)
    if len(head) < HEADER_SIZE:
        raise _fail("truncated", f"{len(head)} bytes, shorter than the header", path)
    raw = _HEADER.unpack_from(head)
    version, reason_byte, flags, reserved, meta_len = raw[1], raw[2], raw[3], raw[7], raw[6]
    if version != FORMAT_VERSION:
        raise _fail("unsupported_version", f"version {version}, this reader knows 1", path)
    if flags or reserved:
        raise _fail("bad_header", f"flags {flags} and reserved {reserved} must be 0", path)
    if meta_len > MAX_META_LEN:
        raise _fail("bad_header", f"meta_len {meta_len} over {MAX_META_LEN}", path)
    reason = _REASON_OF_BYTE.get(reason_byte)
    if reason is None:
        raise _fail("unknown_save_reason", f"byte {reason_byte}", path)
    fixed = _Fixed(version, reason, flags, raw[4], raw[5], meta_len, *raw[8:13])
    if file_size is not None and file_size != fixed.file_size:
        tag = "truncated" if file_size < fixed.file_size else "trailing_bytes"
        raise _fail(tag, f"file is {file_size} bytes, header says {fixed.file_size}", path)
    return fixed


def _unpack_meta(meta: BytesLike) -> tuple[Namespace, Mapping[str, Any]]:
    try:
        decoded = msgpack.unpackb(meta, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on arbitrary bytes
        raise _fail("bad_meta", f"not msgpack: {exc}") from None
    if not isinstance(decoded, dict) or not all(isinstance(k, str) for k in decoded):
        raise _fail("bad_meta", "not a map with string keys")
    try:
        ns = Namespace(decoded["fingerprint"], decoded["quant"], decoded["ctx_hash"])
    except (KeyError, ValueError) as exc:
        raise _fail("bad_meta", f"bad namespace: {exc}") from None
    extras = {k: v for k, v in decoded.items() if k not in _NAMESPACE_KEYS}
    return ns, MappingProxyType(extras)


def _finish(fixed: _Fixed, head: memoryview, rest: memoryview, path: str | None) -> RowHeader:
    """Verify the prefix checksum, the meta and the key; build the header."""
    split = 4 * fixed.n_tokens
    token_view, meta_view = rest[:split], rest[split : split + fixed.meta_len]
    actual = _prefix_checksum(head, token_view, meta_view)
    if actual != fixed.prefix_checksum:
        detail = f"prefix: header says {fixed.prefix_checksum:016x}, computed {actual:016x}"
        raise _fail("checksum_mismatch", detail, path)
    try:
        ns, extras = _unpack_meta(meta_view)
    except CacheFormatError as exc:
        raise _fail(exc.reason, exc.detail, path) from None
    key = make_key_encoded(ns, token_view)
    if key != fixed.key:
        raise _fail("key_mismatch", f"header {fixed.key.hex()}, recomputed {key.hex()}", path)
    return RowHeader(
        version=fixed.version,
        reason=fixed.reason,
        flags=fixed.flags,
        hit_count=fixed.hit_count,
        namespace=ns,
        token_bytes=bytes(token_view),
        created=fixed.created,
        payload_len=fixed.payload_len,
        payload_offset=fixed.prefix_len,
        key=key,
        prefix_checksum=fixed.prefix_checksum,
        payload_checksum=fixed.payload_checksum,
        extras=extras,
    )


def _check_expected(header: RowHeader, expected_key: bytes | None, path: str | None) -> None:
    if expected_key is not None and header.key != expected_key:
        detail = f"expected {bytes(expected_key).hex()}, file has {header.key.hex()}"
        raise _fail("key_mismatch", detail, path)


def _check_payload(header: RowHeader, payload: memoryview, path: str | None) -> None:
    if payload.nbytes != header.payload_len:
        tag = "truncated" if payload.nbytes < header.payload_len else "trailing_bytes"
        raise _fail(tag, f"payload is {payload.nbytes} bytes, header says {header.payload_len}")
    actual = xxhash.xxh3_64_intdigest(payload)
    if actual != header.payload_checksum:
        detail = f"payload: header says {header.payload_checksum:016x}, computed {actual:016x}"
        raise _fail("checksum_mismatch", detail, path)


def parse_prefix(buf: Any, file_size: int | None = None) -> RowHeader:
    """Parse and verify a row's prefix (header, tokens, meta), not its payload.

    ``buf`` starts at the row's first byte and holds at least the prefix
    (more is ignored). With ``file_size``, the header's sizes must add up to
    it exactly. Checks everything the format defines except the payload
    checksum; the startup scan uses this.

    Raises:
        CacheFormatError: any check fails (see the module docstring).
    """
    view = _flat(buf, "buf")
    fixed = _parse_fixed(view[:HEADER_SIZE], file_size, None)
    if view.nbytes < fixed.prefix_len:
        raise _fail("truncated", f"{view.nbytes} bytes, prefix needs {fixed.prefix_len}")
    return _finish(fixed, view[:HEADER_SIZE], view[HEADER_SIZE : fixed.prefix_len], None)


def parse(buf: Any, expected_key: bytes | None = None) -> tuple[RowHeader, memoryview]:
    """Parse and fully verify a whole row held in memory.

    Returns the header and the payload as a view into ``buf`` (no copy).

    Raises:
        CacheFormatError: any check fails, including the payload checksum and
            ``expected_key``.
    """
    view = _flat(buf, "buf")
    header = parse_prefix(view, file_size=view.nbytes)
    _check_expected(header, expected_key, None)
    payload = view[header.payload_offset :]
    _check_payload(header, payload, None)
    return header, payload


def check_payload(header: RowHeader, payload: Any) -> None:
    """Verify that ``payload`` is the one ``header`` describes (size, checksum).

    For rows whose prefix and payload are held apart (the RAM tier).

    Raises:
        CacheFormatError: the size or the checksum differs.
    """
    _check_payload(header, _flat(payload, "payload"), None)


# ---------------------------------------------------------------- files


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; return the bytes read (fewer only at end of file)."""
    done = 0
    while done < view.nbytes:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            os.lseek(fd, offset + done, os.SEEK_SET)
            got = os.readv(fd, [view[done:]])
        if got == 0:
            break
        done += got
    return done


def _pread_exact(fd: int, size: int, offset: int) -> memoryview:
    view = memoryview(bytearray(size))
    return view[: _pread_into(fd, view, offset)]


def _read_prefix(fd: int, path: str) -> RowHeader:
    file_size = os.fstat(fd).st_size
    head = _pread_exact(fd, HEADER_SIZE, 0)
    fixed = _parse_fixed(head, file_size, path)
    rest = _pread_exact(fd, fixed.prefix_len - HEADER_SIZE, HEADER_SIZE)
    if rest.nbytes < fixed.prefix_len - HEADER_SIZE:
        raise _fail("truncated", "the file shrank while being read", path)
    return _finish(fixed, head, rest, path)


def _open_read(path: str | os.PathLike[str]) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


def read_prefix_file(path: str | os.PathLike[str]) -> RowHeader:
    """Read and verify a row file's prefix; the payload is neither read nor checked.

    The file's size (from ``fstat``) must be exactly what the header says.

    Raises:
        CacheFormatError: any prefix check fails (``path`` is set).
        OSError: the file cannot be opened or read.
    """
    fd = _open_read(path)
    try:
        return _read_prefix(fd, os.fsdecode(path))
    finally:
        os.close(fd)


def _allocated(allocate: Allocator | None, size: int) -> memoryview:
    if allocate is None:
        return memoryview(bytearray(size))
    view = _flat(allocate(size), "allocate(n)")
    if view.readonly or view.nbytes < size:
        raise ValueError(f"allocate({size}) must return a writable buffer of >= {size} bytes")
    return view[:size]


def read_file(
    path: str | os.PathLike[str],
    expected_key: bytes | None = None,
    allocate: Allocator | None = None,
) -> tuple[RowHeader, memoryview]:
    """Read and fully verify a row file.

    The prefix is read and verified first (and ``expected_key`` compared)
    before anything is allocated for the payload; then ``allocate(payload_len)``
    (default: a new ``bytearray``) provides the buffer, the payload is read
    into it with ``preadv`` and its checksum verified. Returns the header and
    a view of exactly ``payload_len`` bytes of that buffer. On error, what
    the buffer holds is undefined and no payload is returned.

    Raises:
        CacheFormatError: any check fails, including the payload checksum and
            ``expected_key``; a file shorter or longer than its header says
            (even if it changes while being read) is ``truncated`` or
            ``trailing_bytes``.
        ValueError: ``allocate`` returned a read-only or too small buffer.
        OSError: the file cannot be opened or read.
    """
    name = os.fsdecode(path)
    fd = _open_read(path)
    try:
        header = _read_prefix(fd, name)
        _check_expected(header, expected_key, name)
        payload = _allocated(allocate, header.payload_len)
        if _pread_into(fd, payload, header.payload_offset) < header.payload_len:
            raise _fail("truncated", "the file shrank while being read", name)
        if os.pread(fd, 1, header.file_size):
            raise _fail("trailing_bytes", "the file grew while being read", name)
        _check_payload(header, payload, name)
        return header, payload
    finally:
        os.close(fd)


def write_hit_count(target: str | os.PathLike[str] | int, hit_count: int) -> bool:
    """Rewrite a row file's hit count in place (4 bytes at offset 8); best effort.

    ``target`` is a path or an open, writable file descriptor. Counts above
    2**32 - 1 are stored saturated. A path is checked to hold a version 1 row
    (magic and version) before writing. The file stays valid: the field is
    outside both checksums.

    Returns:
        True if written; False on any ``OSError`` or if the path is not a row.

    Raises:
        ValueError: ``hit_count`` is negative.
    """
    if hit_count < 0:
        raise ValueError(f"hit_count must be >= 0, got {hit_count}")
    data = _HIT_COUNT.pack(min(hit_count, _U32_MAX))
    try:
        if isinstance(target, int):
            return os.pwrite(target, data, HIT_COUNT_OFFSET) == len(data)
        fd = os.open(target, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            if os.pread(fd, 6, 0) != MAGIC + FORMAT_VERSION.to_bytes(2, "little"):
                return False
            return os.pwrite(fd, data, HIT_COUNT_OFFSET) == len(data)
        finally:
            os.close(fd)
    except OSError:
        return False
