"""The .kvc row format: framing, strict parsing, files (spec 6.2, adapted to our format)."""

from __future__ import annotations

import mmap
import os
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from erllama_py.cache.key import (
    TOKEN_MAX,
    Namespace,
    ctx_params_hash,
    encode_tokens,
    make_key,
)
from erllama_py.cache.kvc import (
    FORMAT_VERSION,
    HEADER_SIZE,
    HIT_COUNT_OFFSET,
    MAGIC,
    MAX_META_LEN,
    REASON_BYTES,
    RowHeader,
    SaveReason,
    build_prefix,
    build_prefix_encoded,
    check_payload,
    parse,
    parse_prefix,
    read_file,
    read_prefix_file,
    write_hit_count,
)
from erllama_py.errors import CacheFormatError, InvalidTokensError

NS = Namespace(bytes(range(32)), "q4_k_m", ctx_params_hash(n_ctx=2048))
TOKENS = [1, 2, 3, 500, TOKEN_MAX]
PAYLOAD = bytes(range(64)) * 3
CREATED = 1_700_000_000_123_456_789
GOLDEN = Path(__file__).parent / "data" / "golden_v1.kvc"
REGENERATE = os.environ.get("ERLLAMA_REGENERATE_GOLDEN") == "1"


def _row(
    tokens: list[int] = TOKENS,
    payload: bytes = PAYLOAD,
    reason: SaveReason | str = "cold",
    **kwargs: Any,
) -> tuple[bytes, bytes]:
    """A whole row in memory, and its key."""
    prefix, key = build_prefix(NS, tokens, payload, reason, created=CREATED, **kwargs)
    return prefix + payload, key


def _sizes(row: bytes | bytearray) -> tuple[int, int]:
    n_tokens, meta_len = struct.unpack_from("<II", row, 12)
    return n_tokens, meta_len


def _reseal(row: bytearray) -> bytearray:
    """Recompute the prefix checksum exactly as the module docstring documents it."""
    n_tokens, meta_len = _sizes(row)
    covered = row[:8] + bytes(4) + row[12:64] + row[72 : 72 + 4 * n_tokens + meta_len]
    struct.pack_into("<Q", row, 64, xxhash.xxh3_64_intdigest(covered))
    return row


def _with_meta(row: bytes, meta: bytes) -> bytearray:
    """The row with its meta replaced (and the header resealed)."""
    n_tokens, meta_len = _sizes(row)
    start = HEADER_SIZE + 4 * n_tokens
    out = bytearray(row[:start] + meta + row[start + meta_len :])
    struct.pack_into("<I", out, 16, len(meta))
    return _reseal(out)


def _write(directory: Path, data: bytes | bytearray, name: str = "row.kvc") -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def _reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(CacheFormatError) as caught:
        call()
    return caught.value.reason


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for tests that write files from hypothesis examples."""
    return tmp_path_factory.mktemp("kvc")


# ---------------------------------------------------------------- round trips


def _assert_header(header: RowHeader, key: bytes, tokens: list[int], payload: bytes) -> None:
    assert header.version == FORMAT_VERSION == 1
    assert header.reason is SaveReason.COLD
    assert header.hit_count == 0
    assert header.namespace == NS
    assert header.tokens == tokens
    assert header.token_bytes == encode_tokens(tokens)
    assert header.n_tokens == len(tokens)
    assert header.created == CREATED
    assert header.payload_len == len(payload)
    assert header.key == key == make_key(NS, tokens)
    assert header.payload_checksum == xxhash.xxh3_64_intdigest(payload)


def test_build_then_parse_round_trips_every_field() -> None:
    row, key = _row(extra={"model": "tiny", "hostname": "h", "erllama_py": "0.1.0"})
    header, payload = parse(row, key)
    _assert_header(header, key, TOKENS, PAYLOAD)
    assert bytes(payload) == PAYLOAD
    assert dict(header.extras) == {"model": "tiny", "hostname": "h", "erllama_py": "0.1.0"}
    assert header.file_size == len(row)


def test_build_then_read_file_round_trips(tmp_path: Path) -> None:
    row, key = _row()
    header, payload = read_file(_write(tmp_path, row), expected_key=key)
    _assert_header(header, key, TOKENS, PAYLOAD)
    assert bytes(payload) == PAYLOAD
    assert read_prefix_file(tmp_path / "row.kvc") == header


def test_empty_payload_round_trips(tmp_path: Path) -> None:
    row, key = _row(payload=b"")
    assert bytes(parse(row, key)[1]) == b""
    header, payload = read_file(_write(tmp_path, row), key)
    assert header.payload_len == 0
    assert payload.nbytes == 0


def test_empty_token_list_round_trips() -> None:
    row, key = _row(tokens=[])
    header, _ = parse(row, key)
    assert header.tokens == []
    assert key == make_key(NS, [])


def test_3_mb_payload_round_trips_through_a_file(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    prefix, key = build_prefix(NS, list(range(3000)), payload, "finish")
    path = tmp_path / "big.kvc"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY)
    try:
        written = os.writev(fd, [prefix, payload])
    finally:
        os.close(fd)
    assert written == len(prefix) + len(payload)
    header, loaded = read_file(path, key)
    assert loaded == payload
    assert header.reason is SaveReason.FINISH
    assert header.tokens == list(range(3000))


def test_unknown_quant_rows_are_readable() -> None:
    ns = Namespace(bytes(32), "iq9_future", bytes(16))
    prefix, key = build_prefix(ns, [1], b"p", "cold")
    header, _ = parse(prefix + b"p", key)
    assert header.namespace.quant == "iq9_future"
    assert header.namespace.quant_byte == 255


def test_build_prefix_encoded_equals_build_prefix() -> None:
    encoded = build_prefix_encoded(NS, encode_tokens(TOKENS), PAYLOAD, "cold", created=CREATED)
    assert encoded == build_prefix(NS, TOKENS, PAYLOAD, "cold", created=CREATED)


@pytest.mark.parametrize("reason", list(SaveReason), ids=lambda r: r.name.lower())
def test_save_reason_is_one_byte_at_offset_6(reason: SaveReason) -> None:
    by_enum, key = _row(reason=reason)
    assert by_enum[6] == REASON_BYTES[reason]
    assert _row(reason=reason.value)[0] == by_enum
    assert parse(by_enum, key)[0].reason is reason


def test_save_reason_numbering_is_stable() -> None:
    assert [(r.name, REASON_BYTES[r]) for r in SaveReason] == [
        ("COLD", 1), ("CONTINUED", 2), ("FINISH", 3), ("EVICT", 4), ("SHUTDOWN", 5),
    ]  # fmt: skip


def test_unknown_save_reason_is_refused_when_building() -> None:
    with pytest.raises(ValueError, match="reason"):
        _row(reason="whim")


# ---------------------------------------------------------------- layout


def test_header_fields_sit_at_their_documented_offsets() -> None:
    row, key = _row()
    n_tokens, meta_len = _sizes(row)
    assert row[0:4] == MAGIC == b"EKVC"
    assert struct.unpack_from("<H", row, 4)[0] == 1
    assert row[6] == REASON_BYTES[SaveReason.COLD]
    assert row[7] == 0
    assert struct.unpack_from("<I", row, HIT_COUNT_OFFSET)[0] == 0
    assert n_tokens == len(TOKENS)
    assert struct.unpack_from("<I", row, 20)[0] == 0
    assert struct.unpack_from("<Q", row, 24)[0] == len(PAYLOAD)
    assert struct.unpack_from("<Q", row, 32)[0] == CREATED
    assert row[40:56] == key
    assert struct.unpack_from("<Q", row, 56)[0] == xxhash.xxh3_64_intdigest(PAYLOAD)
    assert bytes(_reseal(bytearray(row))) == row  # the prefix checksum at 64, as documented
    assert row[HEADER_SIZE : HEADER_SIZE + 4 * n_tokens] == encode_tokens(TOKENS)
    meta = msgpack.unpackb(row[HEADER_SIZE + 4 * n_tokens : HEADER_SIZE + 4 * n_tokens + meta_len])
    assert meta == {"fingerprint": NS.fingerprint, "quant": "q4_k_m", "ctx_hash": NS.ctx_hash}
    assert len(row) == HEADER_SIZE + 4 * n_tokens + meta_len + len(PAYLOAD)


def test_golden_file_pins_the_version_1_format() -> None:
    # To regenerate after a deliberate format change (which must bump the version):
    # ERLLAMA_REGENERATE_GOLDEN=1 pytest tests/cache/test_kvc.py -k golden
    ns = Namespace(bytes(range(32)), "q4_k_m", bytes(range(100, 116)))
    prefix, key = build_prefix(
        ns, [1, 2, 3, TOKEN_MAX], bytes(range(32)), "finish",
        created=1_700_000_000_000_000_000, extra={"model": "golden"},
    )  # fmt: skip
    if REGENERATE:
        GOLDEN.write_bytes(prefix + bytes(range(32)))
    golden = GOLDEN.read_bytes()
    assert prefix + bytes(range(32)) == golden
    header, payload = parse(golden, key)
    assert header.tokens == [1, 2, 3, TOKEN_MAX]
    assert bytes(payload) == bytes(range(32))
    assert key.hex() == "18d10dfb69f320f11161c852eda55086"  # key derivation is pinned too


# ---------------------------------------------------------------- strict parsing


def test_bad_magic_is_rejected() -> None:
    row = bytearray(_row()[0])
    row[0:4] = b"KVC\x01"
    assert _reason_of(lambda: parse(row)) == "bad_magic"
    assert _reason_of(lambda: parse(b"GARBAGE")) == "bad_magic"


def test_bad_version_is_rejected_naming_it() -> None:
    row = bytearray(_row()[0])
    struct.pack_into("<H", row, 4, 99)
    with pytest.raises(CacheFormatError) as caught:
        parse(_reseal(row))
    assert caught.value.reason == "unsupported_version"
    assert "99" in caught.value.detail


@pytest.mark.parametrize(("offset", "value"), [(7, 1), (20, 4)], ids=["flags", "reserved"])
def test_nonzero_flags_or_reserved_bytes_are_rejected(offset: int, value: int) -> None:
    row = bytearray(_row()[0])
    row[offset] = value
    assert _reason_of(lambda: parse(_reseal(row))) == "bad_header"


@pytest.mark.parametrize("byte", [0, 6, 255])
def test_unknown_save_reason_byte_is_rejected(byte: int) -> None:
    row = bytearray(_row()[0])
    row[6] = byte
    assert _reason_of(lambda: parse(_reseal(row))) == "unknown_save_reason"


def test_meta_longer_than_the_cap_is_rejected_before_reading_it() -> None:
    row = bytearray(_row()[0])
    struct.pack_into("<I", row, 16, MAX_META_LEN + 1)
    assert _reason_of(lambda: parse_prefix(row)) == "bad_header"


def test_payload_checksum_mismatch_is_rejected_but_not_by_parse_prefix() -> None:
    row = bytearray(_row()[0])
    row[-1] ^= 0x55
    with pytest.raises(CacheFormatError) as caught:
        parse(row)
    assert caught.value.reason == "checksum_mismatch"
    assert "payload" in caught.value.detail
    assert parse_prefix(row, file_size=len(row)).tokens == TOKENS


@pytest.mark.parametrize("offset", [HEADER_SIZE, HEADER_SIZE + 4 * len(TOKENS) + 2, 33, 60, 64])
def test_prefix_checksum_mismatch_is_rejected(offset: int) -> None:
    row = bytearray(_row()[0])
    row[offset] ^= 0x01
    with pytest.raises(CacheFormatError) as caught:
        parse_prefix(row)
    assert caught.value.reason == "checksum_mismatch"
    assert "prefix" in caught.value.detail


def test_expected_key_mismatch_is_rejected() -> None:
    row, key = _row()
    other = make_key(NS, [1, 2, 3])
    assert _reason_of(lambda: parse(row, other)) == "key_mismatch"
    assert parse(row, key)[0].key == key


def test_a_header_key_that_does_not_match_the_tokens_is_rejected() -> None:
    row = bytearray(_row()[0])
    row[40:56] = make_key(NS, [1, 2, 3])
    assert _reason_of(lambda: parse_prefix(_reseal(row))) == "key_mismatch"


def test_a_meta_namespace_that_does_not_match_the_key_is_rejected() -> None:
    row, _ = _row()
    meta = msgpack.packb({"fingerprint": bytes(32), "quant": "q4_k_m", "ctx_hash": NS.ctx_hash})
    assert _reason_of(lambda: parse_prefix(_with_meta(row, meta))) == "key_mismatch"


@pytest.mark.parametrize(
    "meta",
    [
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"fingerprint": bytes(32), "quant": "q4_k_m"}),
        msgpack.packb({"fingerprint": bytes(31), "quant": "q4_k_m", "ctx_hash": bytes(16)}),
        msgpack.packb({"fingerprint": bytes(32), "quant": 7, "ctx_hash": bytes(16)}),
        msgpack.packb({1: 2}),
        msgpack.packb({"fingerprint": bytes(32)}) + b"\x00",
        b"",
    ],
    ids=["invalid", "list", "missing", "short-fp", "int-quant", "int-key", "extra-data", "empty"],
)
def test_malformed_meta_is_rejected(meta: bytes) -> None:
    assert _reason_of(lambda: parse_prefix(_with_meta(_row()[0], meta))) == "bad_meta"


def test_unknown_meta_keys_are_ignored_and_returned_as_extras() -> None:
    row, key = _row()
    meta = msgpack.packb(
        {
            "fingerprint": NS.fingerprint,
            "quant": NS.quant,
            "ctx_hash": NS.ctx_hash,
            "from_the_future": {"nested": [1, 2.5, None]},
        }
    )
    header, _ = parse(_with_meta(row, meta), key)
    assert header.extras["from_the_future"] == {"nested": [1, 2.5, None]}


@pytest.mark.parametrize(
    "extra",
    [{"quant": "x"}, {"fingerprint": b""}, {1: "x"}, {"obj": object()}, {"nested": {1: 2}}],
    ids=["quant", "fingerprint", "int-key", "object", "nested-int-key"],
)
def test_extras_that_would_not_read_back_are_refused_when_building(extra: Any) -> None:
    with pytest.raises(ValueError, match="extra"):
        _row(extra=extra)


def test_truncated_and_trailing_bytes_are_rejected() -> None:
    row, _ = _row()
    assert _reason_of(lambda: parse(row[:-1])) == "truncated"
    assert _reason_of(lambda: parse(row + b"\x00")) == "trailing_bytes"
    assert _reason_of(lambda: parse(b"")) == "truncated"
    assert _reason_of(lambda: parse_prefix(row[:HEADER_SIZE])) == "truncated"


def test_truncated_and_grown_files_are_rejected_with_the_path(tmp_path: Path) -> None:
    row, key = _row()
    for data, reason in [(row[:-1], "truncated"), (row + b"x", "trailing_bytes")]:
        path = _write(tmp_path, data)
        with pytest.raises(CacheFormatError) as caught:
            read_file(path, key)
        assert (caught.value.reason, caught.value.path) == (reason, str(path))
        assert _reason_of(lambda p=path: read_prefix_file(p)) == reason  # type: ignore[misc]


def test_parse_prefix_accepts_a_buffer_with_the_payload_or_without() -> None:
    row, _ = _row()
    prefix, _ = build_prefix(NS, TOKENS, PAYLOAD, "cold", created=CREATED)
    assert parse_prefix(prefix) == parse_prefix(row) == parse_prefix(row, file_size=len(row))
    assert _reason_of(lambda: parse_prefix(prefix, file_size=len(prefix))) == "truncated"


def test_check_payload_verifies_a_payload_held_apart() -> None:
    prefix, _ = build_prefix(NS, TOKENS, PAYLOAD, "cold")
    header = parse_prefix(prefix)
    check_payload(header, PAYLOAD)
    assert _reason_of(lambda: check_payload(header, PAYLOAD[:-1] + b"\x00")) == "checksum_mismatch"
    assert _reason_of(lambda: check_payload(header, PAYLOAD[:-1])) == "truncated"


def test_read_prefix_file_does_not_check_the_payload(tmp_path: Path) -> None:
    row = bytearray(_row()[0])
    row[-5] ^= 0xFF
    path = _write(tmp_path, row)
    assert read_prefix_file(path).tokens == TOKENS
    assert _reason_of(lambda: read_file(path)) == "checksum_mismatch"


def test_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_file(tmp_path / "absent.kvc")


# ---------------------------------------------------------------- hit count


def test_hit_count_rewrite_in_place_keeps_the_file_valid(tmp_path: Path) -> None:
    row, key = _row()
    path = _write(tmp_path, row)
    assert write_hit_count(path, 41)
    header, payload = read_file(path, key)
    assert header.hit_count == 41
    assert bytes(payload) == PAYLOAD
    fd = os.open(path, os.O_RDWR)
    try:
        assert write_hit_count(fd, 42)
    finally:
        os.close(fd)
    assert read_prefix_file(path).hit_count == 42
    assert path.stat().st_size == len(row)


def test_hit_count_saturates_at_u32_max(tmp_path: Path) -> None:
    path = _write(tmp_path, _row()[0])
    assert write_hit_count(path, 2**40)
    assert read_prefix_file(path).hit_count == 2**32 - 1


def test_hit_count_write_is_best_effort(tmp_path: Path) -> None:
    assert not write_hit_count(tmp_path / "absent.kvc", 1)
    other = _write(tmp_path, b"not a row at all", "other.kvc")
    assert not write_hit_count(other, 1)
    assert other.read_bytes() == b"not a row at all"
    assert not write_hit_count(-1, 1)  # a bad descriptor
    with pytest.raises(ValueError):
        write_hit_count(other, -1)


# ---------------------------------------------------------------- zero copy


def _payload_of(kind: str, size: int) -> Any:
    if kind == "bytes":
        return bytes(size)
    if kind == "bytearray":
        return bytearray(size)
    if kind == "memoryview":
        return memoryview(bytes(size)).toreadonly()
    if kind == "mmap":
        return mmap.mmap(-1, size)
    if kind == "numpy-f32-2d":
        return np.zeros((size // 4 // 1024, 1024), dtype=np.float32)
    return np.zeros(size, dtype=np.uint8)


@pytest.mark.parametrize(
    "kind", ["bytes", "bytearray", "memoryview", "mmap", "numpy", "numpy-f32-2d"]
)
def test_build_prefix_hashes_the_payload_in_place_without_copying(kind: str) -> None:
    size = 32 * 1024 * 1024
    payload = _payload_of(kind, size)
    tracemalloc.start()
    try:
        prefix, key = build_prefix(NS, TOKENS, payload, "cold")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak} bytes allocated for a {size}-byte payload"
    header = parse_prefix(prefix)
    assert header.payload_len == size
    assert header.payload_checksum == xxhash.xxh3_64_intdigest(bytes(size))
    assert header.key == key


def test_non_contiguous_payloads_are_refused() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        build_prefix(NS, TOKENS, np.zeros((8, 8), dtype=np.uint8)[:, ::2], "cold")
    with pytest.raises(ValueError, match="buffer"):
        build_prefix(NS, TOKENS, "text", "cold")


def test_bad_tokens_are_refused_when_building() -> None:
    with pytest.raises(InvalidTokensError):
        build_prefix(NS, [1, -2], PAYLOAD, "cold")
    with pytest.raises(InvalidTokensError):
        build_prefix_encoded(NS, b"\x01\x02", PAYLOAD, "cold")


# ---------------------------------------------------------------- allocate


def test_read_file_reads_the_payload_into_the_allocated_buffer(tmp_path: Path) -> None:
    row, key = _row()
    asked: list[int] = []
    target = np.full(len(PAYLOAD) + 100, 0xEE, dtype=np.uint8)

    def allocate(n: int) -> memoryview:
        asked.append(n)
        return target.data

    _, payload = read_file(_write(tmp_path, row), key, allocate=allocate)
    assert asked == [len(PAYLOAD)]
    assert payload.nbytes == len(PAYLOAD)
    assert bytes(payload) == PAYLOAD
    assert target[: len(PAYLOAD)].tobytes() == PAYLOAD  # the bytes landed in our buffer
    assert (target[len(PAYLOAD) :] == 0xEE).all()


def test_read_file_allocates_nothing_when_the_prefix_is_wrong(tmp_path: Path) -> None:
    row, _ = _row()
    asked: list[int] = []
    path = _write(tmp_path, row)
    wrong = make_key(NS, [7])

    def allocate(n: int) -> memoryview:
        asked.append(n)
        return memoryview(bytearray(n))

    assert _reason_of(lambda: read_file(path, wrong, allocate)) == "key_mismatch"
    assert asked == []


@pytest.mark.parametrize(
    "buffer",
    [lambda n: memoryview(bytes(n)), lambda n: memoryview(bytearray(n - 1))],
    ids=["read-only", "too-small"],
)
def test_read_file_refuses_an_unusable_buffer(
    tmp_path: Path, buffer: Callable[[int], memoryview]
) -> None:
    path = _write(tmp_path, _row()[0])
    with pytest.raises(ValueError, match="allocate"):
        read_file(path, allocate=buffer)


def test_a_file_shrinking_during_the_read_is_truncated(tmp_path: Path) -> None:
    row, key = _row()
    path = _write(tmp_path, row)

    def allocate(n: int) -> memoryview:
        os.truncate(path, len(row) - 10)  # another process cuts the file mid-read
        return memoryview(bytearray(n))

    assert _reason_of(lambda: read_file(path, key, allocate)) == "truncated"


def test_a_file_growing_during_the_read_has_trailing_bytes(tmp_path: Path) -> None:
    row, key = _row()
    path = _write(tmp_path, row)

    def allocate(n: int) -> memoryview:
        with path.open("ab") as f:
            f.write(b"more")
        return memoryview(bytearray(n))

    assert _reason_of(lambda: read_file(path, key, allocate)) == "trailing_bytes"


# ---------------------------------------------------------------- every byte matters


def test_flipping_any_byte_but_the_hit_count_fails_every_reader(tmp_path: Path) -> None:
    row, key = _row(tokens=[1, 2, 3], payload=bytes(range(32)))
    path = tmp_path / "row.kvc"
    for offset in range(len(row)):
        damaged = bytearray(row)
        damaged[offset] ^= 0xFF
        if HIT_COUNT_OFFSET <= offset < HIT_COUNT_OFFSET + 4:
            assert parse(damaged, key)[0].hit_count != 0
            continue
        path.write_bytes(damaged)
        with pytest.raises(CacheFormatError):
            parse(damaged)
        with pytest.raises(CacheFormatError):
            read_file(path)


def test_truncating_at_any_length_fails_every_reader(tmp_path: Path) -> None:
    row, _ = _row(tokens=[1, 2, 3], payload=bytes(range(32)))
    path = tmp_path / "row.kvc"
    for length in range(len(row)):
        path.write_bytes(row[:length])
        with pytest.raises(CacheFormatError):
            parse(row[:length])
        with pytest.raises(CacheFormatError):
            read_file(path)
        with pytest.raises(CacheFormatError):
            read_prefix_file(path)


_tokens = st.lists(st.integers(0, TOKEN_MAX), max_size=64)
_payloads = st.binary(max_size=512)
_reasons = st.sampled_from(list(SaveReason))


@given(_tokens, _payloads, _reasons, st.integers(0, 2**64 - 1))
def test_any_row_round_trips(
    tokens: list[int], payload: bytes, reason: SaveReason, created: int
) -> None:
    prefix, key = build_prefix(NS, tokens, payload, reason, created=created)
    row = prefix + payload
    assert row[:4] == MAGIC
    assert row[4:6] == b"\x01\x00"
    header, loaded = parse(row, key)
    assert (header.tokens, bytes(loaded), header.reason, header.created) == (
        tokens,
        payload,
        reason,
        created,
    )


@settings(max_examples=50)
@given(_tokens, _payloads, st.data())
def test_flipping_any_byte_fails_read_file_and_returns_no_payload(
    scratch: Path, tokens: list[int], payload: bytes, data: st.DataObject
) -> None:
    row, key = _row(tokens=tokens, payload=payload)
    offset = data.draw(
        st.integers(0, len(row) - 1).filter(
            lambda i: not HIT_COUNT_OFFSET <= i < HIT_COUNT_OFFSET + 4
        )
    )
    damaged = bytearray(row)
    damaged[offset] ^= data.draw(st.integers(1, 255))
    path = _write(scratch, damaged)
    result = None
    with pytest.raises(CacheFormatError):
        result = read_file(path, key)
    assert result is None


@given(_tokens, _payloads, st.binary(min_size=16, max_size=16))
def test_a_wrong_expected_key_is_always_rejected(
    tokens: list[int], payload: bytes, wrong: bytes
) -> None:
    row, key = _row(tokens=tokens, payload=payload)
    if wrong != key:
        assert _reason_of(lambda: parse(row, wrong)) == "key_mismatch"
