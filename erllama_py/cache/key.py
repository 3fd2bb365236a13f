"""Cache identity: namespaces, token encoding and row keys.

A row's key is token-exact (DESIGN.md, invariant 1)::

    key = xxh3_128( fingerprint[32] ‖ quant_byte[1] ‖ ctx_hash[16] ‖ u32_le(t) for t in tokens )

The first 49 bytes are the :class:`Namespace` prefix: the model fingerprint
(the LoRA-effective one when adapters are loaded), the quant byte from the
stable table :data:`QUANT_BYTES`, and :func:`ctx_params_hash` of the context
parameters that change the state layout. Every token follows as a u32
little-endian. The empty token list has a key too.

Everything here is pure and thread-safe: no I/O, no meta actor.
"""

from __future__ import annotations

import array
import operator
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias

import msgpack
import numpy as np
import numpy.typing as npt
import xxhash

from erllama_py.errors import InvalidTokensError

__all__ = [
    "FINGERPRINT_SIZE",
    "CTX_HASH_SIZE",
    "KEY_SIZE",
    "NAMESPACE_PREFIX_SIZE",
    "TOKEN_MAX",
    "UNKNOWN_QUANT_BYTE",
    "QUANT_BYTES",
    "quant_byte",
    "quant_name",
    "Namespace",
    "ctx_params_hash",
    "TokenInput",
    "BytesLike",
    "encode_tokens",
    "decode_tokens",
    "make_key",
    "make_key_encoded",
    "key_hex",
    "key_from_hex",
    "prefix_keys",
    "StrideWalk",
    "stride_walk",
]

FINGERPRINT_SIZE = 32  # bytes, SHA-256 of the model file (or its LoRA-effective variant)
CTX_HASH_SIZE = 16  # bytes, xxh3-128 of the layout-changing context parameters
KEY_SIZE = 16  # bytes, xxh3-128 digest
NAMESPACE_PREFIX_SIZE = FINGERPRINT_SIZE + 1 + CTX_HASH_SIZE  # 49 bytes
TOKEN_MAX = 2**32 - 1
UNKNOWN_QUANT_BYTE = 255

_QUANT_ORDER = (
    "f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k_m", "q4_k_s", "q5_k_m",
    "q5_k_s", "q6_k", "q8_k", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq2_xxs", "iq2_xs",
    "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "iq1_s", "iq1_m", "iq4_nl",
    "iq4_xs", "bf16",
)  # fmt: skip

QUANT_BYTES: Mapping[str, int] = MappingProxyType({q: i for i, q in enumerate(_QUANT_ORDER)})
"""The original's stable quant table (f32=0 ... bf16=29); never renumber an entry."""

_QUANT_NAMES: Mapping[int, str] = MappingProxyType(
    {**{i: q for q, i in QUANT_BYTES.items()}, UNKNOWN_QUANT_BYTE: "unknown"}
)

# The C type whose items are 4 bytes, for zero-parse token encoding.
_U32 = "I" if array.array("I").itemsize == 4 else "L"
_LITTLE = sys.byteorder == "little"

BytesLike: TypeAlias = bytes | bytearray | memoryview
TokenInput: TypeAlias = Iterable[int] | npt.NDArray[Any]


def quant_byte(name: str) -> int:
    """Return the stable byte of a quant name (case-insensitive).

    Unknown names map to 255. Unlike the original (its bug 10.6), 255 is an
    ordinary, readable value: the fingerprint already separates models, so two
    unknown quants of the same model file cannot collide in practice.
    """
    return QUANT_BYTES.get(name.lower(), UNKNOWN_QUANT_BYTE)


def quant_name(byte: int) -> str:
    """Return the quant name of a table byte; 255 gives ``"unknown"``.

    Raises:
        ValueError: the byte is not in the table (30..254, or outside a byte).
    """
    try:
        return _QUANT_NAMES[byte]
    except KeyError:
        raise ValueError(f"unknown quant byte {byte!r}") from None


def _describe(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{type(value).__name__} of {len(bytes(value))} bytes"
    return f"{type(value).__name__} {value!r}"


@dataclass(frozen=True, repr=False)
class Namespace:
    """The part of a row's identity that is not its tokens.

    Rows of different namespaces never match each other. Construction
    validates every field.

    Raises:
        ValueError: a field has the wrong type or size; the message names it.
    """

    fingerprint: bytes
    """32 bytes: the model file's fingerprint (LoRA-effective when adapters are loaded)."""
    quant: str
    """The quant name (``q4_k_m``, ...); see :data:`QUANT_BYTES`."""
    ctx_hash: bytes
    """16 bytes: :func:`ctx_params_hash` of the layout-changing context parameters."""

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != FINGERPRINT_SIZE:
            raise ValueError(
                f"fingerprint: must be {FINGERPRINT_SIZE} bytes, got {_describe(self.fingerprint)}"
            )
        if not isinstance(self.quant, str) or not self.quant:
            raise ValueError(f"quant: must be a non-empty string, got {_describe(self.quant)}")
        if not isinstance(self.ctx_hash, bytes) or len(self.ctx_hash) != CTX_HASH_SIZE:
            raise ValueError(
                f"ctx_hash: must be {CTX_HASH_SIZE} bytes, got {_describe(self.ctx_hash)}"
            )

    def __repr__(self) -> str:
        return (
            f"Namespace(fingerprint={self.fingerprint.hex()}, quant={self.quant!r}, "
            f"ctx_hash={self.ctx_hash.hex()})"
        )

    @property
    def quant_byte(self) -> int:
        """The quant's stable byte (255 for an unknown quant)."""
        return quant_byte(self.quant)

    @cached_property
    def prefix(self) -> bytes:
        """fingerprint ‖ quant byte ‖ ctx_hash: the 49 bytes every key starts with."""
        return self.fingerprint + bytes((self.quant_byte,)) + self.ctx_hash

    @property
    def id(self) -> str:
        """A short display form, ``<fingerprint[:6]>:<quant>:<ctx_hash[:4]>`` in hex."""
        return f"{self.fingerprint[:6].hex()}:{self.quant}:{self.ctx_hash[:4].hex()}"


_CTX_DOMAIN = b"erllama-py/ctx-params/1"
_SCALARS = (int, float, str, bytes, bool, type(None))


def ctx_params_hash(**params: int | float | str | bytes | bool | None) -> bytes:
    """Hash the context parameters that change the saved state's layout.

    Pass what a restore depends on, for example
    ``ctx_params_hash(n_ctx=4096, type_k="f16", type_v="f16", flash_attn=False)``.
    The encoding is canonical (msgpack of the pairs sorted by name, behind a
    domain tag), so argument order does not matter; types do (``4096`` and
    ``4096.0`` differ).

    Returns:
        16 bytes (xxh3-128), for :attr:`Namespace.ctx_hash`.

    Raises:
        ValueError: a value is not a scalar (int, float, str, bytes, bool, None).
    """
    for name, value in params.items():
        if not isinstance(value, _SCALARS):
            raise ValueError(f"{name}: must be a scalar, got {_describe(value)}")
    pairs = sorted(params.items())
    return xxhash.xxh3_128_digest(msgpack.packb([_CTX_DOMAIN, pairs]))


def _bad_token_error(tokens: Iterable[Any]) -> InvalidTokensError:
    for i, value in enumerate(tokens):
        try:
            as_int = operator.index(value)
        except TypeError:
            return InvalidTokensError(f"token at position {i} is not an integer: {value!r}")
        if not 0 <= as_int <= TOKEN_MAX:
            return InvalidTokensError(f"token at position {i} is {as_int}, outside [0, 2**32)")
    return InvalidTokensError("tokens could not be encoded as u32")


def _encode_ndarray(tokens: npt.NDArray[Any]) -> bytes:
    if tokens.ndim != 1:
        raise InvalidTokensError(f"a token array must be 1-D, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise InvalidTokensError(f"a token array must have an integer dtype, got {tokens.dtype}")
    if tokens.dtype.kind == "i" or tokens.dtype.itemsize > 4:
        bad = np.flatnonzero((tokens < 0) | (tokens > TOKEN_MAX))
        if bad.size:
            i = int(bad[0])
            value = int(tokens[i])
            raise InvalidTokensError(f"token at position {i} is {value}, outside [0, 2**32)")
    return tokens.astype("<u4", copy=False).tobytes()


def encode_tokens(tokens: TokenInput) -> bytes:
    """Encode token ids as u32 little-endian bytes.

    Accepts any iterable of ints (a list is fastest), an ``array.array`` (an
    ``array('I')`` is copied without parsing) or a 1-D numpy integer array.
    ``bool``, being an ``int``, encodes as 0/1 as ``struct`` and ``array`` do.

    Raises:
        InvalidTokensError: an id is outside ``[0, 2**32)`` or not an integer
            (the message names the position and the value), or ``tokens`` is
            ``bytes``/``str`` (use :func:`make_key_encoded` for encoded tokens)
            or not iterable.
    """
    if isinstance(tokens, str | bytes | bytearray | memoryview):
        raise InvalidTokensError(
            f"tokens must be integers, not {type(tokens).__name__} (already encoded tokens "
            "go to the *_encoded functions)"
        )
    if isinstance(tokens, np.ndarray):
        return _encode_ndarray(tokens)
    if isinstance(tokens, array.array) and tokens.typecode == _U32:
        if _LITTLE:
            return tokens.tobytes()
        swapped = array.array(_U32, tokens)
        swapped.byteswap()
        return swapped.tobytes()
    try:
        seq = tokens if isinstance(tokens, list | tuple) else list(tokens)
    except TypeError:
        raise InvalidTokensError(f"tokens must be iterable, got {_describe(tokens)}") from None
    try:
        encoded = array.array(_U32, seq)
    except (OverflowError, TypeError, ValueError):
        raise _bad_token_error(seq) from None
    if not _LITTLE:
        encoded.byteswap()
    return encoded.tobytes()


def _flat(data: BytesLike) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _check_token_bytes(data: BytesLike) -> memoryview:
    view = _flat(data)
    if view.nbytes % 4:
        raise InvalidTokensError(f"encoded tokens must be a multiple of 4 bytes, got {view.nbytes}")
    return view


def decode_tokens(data: BytesLike) -> list[int]:
    """Decode u32 little-endian token bytes into a list of ints.

    Raises:
        InvalidTokensError: the length is not a multiple of 4.
    """
    view = _check_token_bytes(data)
    decoded = array.array(_U32)
    decoded.frombytes(view)
    if not _LITTLE:
        decoded.byteswap()
    return decoded.tolist()


def make_key(ns: Namespace, tokens: TokenInput) -> bytes:
    """Return the 16-byte key of ``tokens`` in namespace ``ns``.

    Raises:
        InvalidTokensError: as :func:`encode_tokens`.
    """
    return make_key_encoded(ns, encode_tokens(tokens))


def make_key_encoded(ns: Namespace, token_bytes: BytesLike) -> bytes:
    """Return the key of already encoded tokens (u32 LE), without copying them.

    Raises:
        InvalidTokensError: the length is not a multiple of 4.
    """
    hasher = xxhash.xxh3_128(ns.prefix)
    hasher.update(_check_token_bytes(token_bytes))
    return hasher.digest()


def key_hex(key: bytes) -> str:
    """Return the 32-character lowercase hex form of a key (the file name stem).

    Raises:
        ValueError: ``key`` is not 16 bytes.
    """
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise ValueError(f"key: must be {KEY_SIZE} bytes, got {_describe(key)}")
    return key.hex()


def key_from_hex(text: str) -> bytes:
    """Parse the hex form of a key (the inverse of :func:`key_hex`).

    Raises:
        ValueError: ``text`` is not 32 lowercase hex digits.
    """
    if len(text) != 2 * KEY_SIZE or text != text.lower():
        raise ValueError(f"key: must be {2 * KEY_SIZE} lowercase hex digits, got {text!r}")
    return bytes.fromhex(text)


def prefix_keys(ns: Namespace, token_bytes: BytesLike, lengths: Iterable[int]) -> list[bytes]:
    """Return the keys of several prefixes of ``token_bytes`` in one pass.

    ``lengths`` are token counts; the result is in their order. The tokens
    are hashed once, the streaming state being read out at each length, so
    the cost is one hash of the longest prefix however many lengths are asked.

    Raises:
        InvalidTokensError: ``token_bytes`` is not a multiple of 4 bytes.
        ValueError: a length is outside ``[0, len(tokens)]``.
    """
    view = _check_token_bytes(token_bytes)
    n_tokens = view.nbytes // 4
    wanted = list(lengths)
    for length in wanted:
        if not 0 <= length <= n_tokens:
            raise ValueError(f"prefix length {length} outside [0, {n_tokens}]")
    hasher = xxhash.xxh3_128(ns.prefix)
    keys: dict[int, bytes] = {}
    done = 0
    for length in sorted(set(wanted)):
        hasher.update(view[done * 4 : length * 4])
        done = length
        keys[length] = hasher.digest()  # digest() leaves the state running
    return [keys[length] for length in wanted]


class StrideWalk(NamedTuple):
    """The result of :func:`stride_walk`; a miss has ``key`` None and ``length`` 0."""

    length: int
    key: bytes | None
    probes: int


def stride_walk(
    ns: Namespace,
    token_bytes: BytesLike,
    stride: int,
    min_tokens: int,
    lookup: Callable[[bytes], bool],
) -> StrideWalk:
    """Find the longest stride-aligned saved prefix by probing exact keys.

    The original's walk (spec 4.10): probe lengths ``start, start - stride,
    ...`` down to ``floor``, where ``start = (L // stride) * stride`` and
    ``floor = max(min_tokens, stride)``; the first length whose key
    ``lookup`` accepts wins. A prompt whose length is a multiple of the
    stride probes itself too.

    Raises:
        ValueError: ``stride <= 0`` or ``min_tokens < 0``.
        InvalidTokensError: ``token_bytes`` is not a multiple of 4 bytes.
    """
    if stride <= 0:
        raise ValueError(f"stride must be > 0, got {stride}")
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
    view = _check_token_bytes(token_bytes)
    start = (view.nbytes // 4 // stride) * stride
    lengths = list(range(start, max(min_tokens, stride) - 1, -stride))
    probes = 0
    for length, key in zip(lengths, prefix_keys(ns, view, lengths), strict=True):
        probes += 1
        if lookup(key):
            return StrideWalk(length, key, probes)
    return StrideWalk(0, None, probes)
