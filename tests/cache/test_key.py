"""Cache identity: quant table, namespaces, token encoding, keys (spec 6.1 and more)."""

from __future__ import annotations

import array

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from erllama_py.cache.key import (
    KEY_SIZE,
    QUANT_BYTES,
    TOKEN_MAX,
    UNKNOWN_QUANT_BYTE,
    Namespace,
    ctx_params_hash,
    decode_tokens,
    encode_tokens,
    key_from_hex,
    key_hex,
    make_key,
    make_key_encoded,
    prefix_keys,
    quant_byte,
    quant_name,
    stride_walk,
)
from erllama_py.errors import InvalidTokensError

FP = bytes(range(32))
CTX = ctx_params_hash(n_ctx=4096, type_k="f16")
NS = Namespace(FP, "q4_k_m", CTX)


# ---------------------------------------------------------------- quant table


def test_quant_table_is_the_originals_stable_numbering() -> None:
    assert len(QUANT_BYTES) == 30
    assert QUANT_BYTES["f32"] == 0
    assert QUANT_BYTES["f16"] == 1
    assert QUANT_BYTES["q4_0"] == 2
    assert QUANT_BYTES["q4_k_m"] == 7
    assert QUANT_BYTES["q6_k"] == 11
    assert QUANT_BYTES["iq4_xs"] == 28
    assert QUANT_BYTES["bf16"] == 29


@pytest.mark.parametrize("name", sorted(QUANT_BYTES))
def test_every_named_quant_round_trips_through_its_byte(name: str) -> None:
    assert quant_name(quant_byte(name)) == name


def test_unknown_quant_name_maps_to_255_and_never_raises() -> None:
    assert quant_byte("q9_future") == UNKNOWN_QUANT_BYTE == 255


def test_quant_byte_255_is_readable_as_unknown() -> None:
    assert quant_name(255) == "unknown"
    assert quant_byte(quant_name(255)) == 255


def test_quant_names_are_case_insensitive() -> None:
    assert quant_byte("Q4_K_M") == quant_byte("q4_k_m") == 7


@pytest.mark.parametrize("byte", [30, 254, -1, 256])
def test_quant_bytes_outside_the_table_are_rejected(byte: int) -> None:
    with pytest.raises(ValueError, match="unknown quant byte"):
        quant_name(byte)


# ---------------------------------------------------------------- namespace


@pytest.mark.parametrize(
    ("fingerprint", "quant", "ctx_hash", "field"),
    [
        (b"short", "q4_0", CTX, "fingerprint"),
        (bytes(33), "q4_0", CTX, "fingerprint"),
        (bytearray(32), "q4_0", CTX, "fingerprint"),
        (FP, "", CTX, "quant"),
        (FP, 7, CTX, "quant"),
        (FP, "q4_0", bytes(32), "ctx_hash"),
        (FP, "q4_0", "x" * 16, "ctx_hash"),
    ],
)
def test_namespace_rejects_a_bad_field_naming_it(
    fingerprint: object, quant: object, ctx_hash: object, field: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        Namespace(fingerprint, quant, ctx_hash)  # type: ignore[arg-type]


def test_namespace_prefix_is_fingerprint_quant_byte_ctx_hash() -> None:
    assert NS.prefix == FP + bytes([7]) + CTX
    assert len(NS.prefix) == 49


def test_namespace_id_is_short_and_readable() -> None:
    assert NS.id == f"{FP[:6].hex()}:q4_k_m:{CTX[:4].hex()}"


def test_namespace_with_unknown_quant_is_valid_and_uses_255() -> None:
    ns = Namespace(FP, "tq1_0", CTX)
    assert ns.prefix[32] == 255


def test_ctx_params_hash_ignores_argument_order_but_not_values() -> None:
    assert len(CTX) == 16
    assert ctx_params_hash(a=1, b="x") == ctx_params_hash(b="x", a=1)
    assert ctx_params_hash(a=1) != ctx_params_hash(a=2)
    assert ctx_params_hash(a=1) != ctx_params_hash(a=1.0)
    assert ctx_params_hash(a=1) != ctx_params_hash(b=1)
    assert ctx_params_hash() != ctx_params_hash(a=None)


def test_ctx_params_hash_rejects_non_scalar_values() -> None:
    with pytest.raises(ValueError, match=r"^layers:"):
        ctx_params_hash(layers=[1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------- tokens


def test_token_encoding_round_trips_including_0_and_the_largest_id() -> None:
    tokens = [0, 1, 2**31, TOKEN_MAX - 1, TOKEN_MAX]
    encoded = encode_tokens(tokens)
    assert len(encoded) == 20
    assert encoded[-4:] == b"\xff\xff\xff\xff"
    assert encoded[4:8] == b"\x01\x00\x00\x00"  # little-endian
    assert decode_tokens(encoded) == tokens


def test_empty_token_list_encodes_to_empty_bytes_and_back() -> None:
    assert encode_tokens([]) == b""
    assert decode_tokens(b"") == []


@pytest.mark.parametrize(
    "tokens",
    [
        (1, 2, 3),
        iter([1, 2, 3]),
        array.array("I", [1, 2, 3]),
        array.array("q", [1, 2, 3]),
        np.array([1, 2, 3], dtype=np.uint32),
        np.array([1, 2, 3], dtype=np.int64),
        np.array([1, 2, 3], dtype=np.int32),
        np.array([1, 2, 3], dtype=">u4"),
        np.array([1, 9, 2, 9, 3, 9], dtype=np.uint32)[::2],
    ],
    ids=[
        "tuple",
        "iterator",
        "array-I",
        "array-q",
        "np-u32",
        "np-i64",
        "np-i32",
        "np-be",
        "np-strided",
    ],
)
def test_every_token_container_encodes_the_same(tokens: object) -> None:
    assert encode_tokens(tokens) == encode_tokens([1, 2, 3])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tokens", "position", "shown"),
    [
        ([1, -1, 3], 1, "-1"),
        ([1, 2, 2**32], 2, str(2**32)),
        ([5, 1.5], 1, "1.5"),
        (["7"], 0, "'7'"),
        ([1, 2, None], 2, "None"),
        (np.array([3, -4], dtype=np.int64), 1, "-4"),
        (np.array([3, 2**32], dtype=np.uint64), 1, str(2**32)),
    ],
)
def test_bad_token_ids_are_rejected_naming_position_and_value(
    tokens: object, position: int, shown: str
) -> None:
    with pytest.raises(InvalidTokensError) as caught:
        encode_tokens(tokens)  # type: ignore[arg-type]
    assert f"position {position}" in str(caught.value)
    assert shown in str(caught.value)


@pytest.mark.parametrize(
    "tokens",
    [b"\x01\x00\x00\x00", "abc", 42, np.zeros((2, 2), dtype=np.uint32), np.array([1.0])],
    ids=["bytes", "str", "int", "2-d", "float-array"],
)
def test_things_that_are_not_token_lists_are_rejected(tokens: object) -> None:
    with pytest.raises(InvalidTokensError):
        encode_tokens(tokens)  # type: ignore[arg-type]


def test_decoding_rejects_a_length_that_is_not_a_multiple_of_4() -> None:
    with pytest.raises(InvalidTokensError, match="multiple of 4"):
        decode_tokens(b"\x00" * 5)


@given(st.lists(st.integers(0, TOKEN_MAX), max_size=200))
def test_token_encoding_round_trips(tokens: list[int]) -> None:
    assert decode_tokens(encode_tokens(tokens)) == tokens


# ---------------------------------------------------------------- keys


def test_key_is_16_bytes_of_xxh3_128_over_prefix_and_tokens() -> None:
    key = make_key(NS, [1, 2, 3])
    assert len(key) == KEY_SIZE == 16
    assert key == xxhash.xxh3_128_digest(NS.prefix + encode_tokens([1, 2, 3]))


def test_key_is_deterministic() -> None:
    assert make_key(NS, [1, 2, 3]) == make_key(Namespace(FP, "q4_k_m", CTX), [1, 2, 3])


@pytest.mark.parametrize(
    ("ns", "tokens"),
    [
        (NS, [1, 2, 4]),
        (NS, [1, 2]),
        (NS, [1, 2, 3, 0]),
        (Namespace(FP, "q8_0", CTX), [1, 2, 3]),
        (Namespace(bytes(32), "q4_k_m", CTX), [1, 2, 3]),
        (Namespace(FP, "q4_k_m", ctx_params_hash(n_ctx=8192)), [1, 2, 3]),
    ],
    ids=["token", "shorter", "longer", "quant", "fingerprint", "ctx"],
)
def test_key_changes_when_any_component_changes(ns: Namespace, tokens: list[int]) -> None:
    assert make_key(ns, tokens) != make_key(NS, [1, 2, 3])


def test_empty_token_list_has_a_key() -> None:
    assert make_key(NS, []) == xxhash.xxh3_128_digest(NS.prefix)


def test_key_of_encoded_tokens_equals_key_of_tokens() -> None:
    encoded = encode_tokens([9, 8, 7])
    assert make_key_encoded(NS, encoded) == make_key(NS, [9, 8, 7])
    assert make_key_encoded(NS, memoryview(encoded)) == make_key(NS, [9, 8, 7])


def test_key_of_encoded_tokens_rejects_a_partial_token() -> None:
    with pytest.raises(InvalidTokensError):
        make_key_encoded(NS, b"\x00" * 6)


def test_key_hex_is_32_lowercase_digits_and_parses_back() -> None:
    key = make_key(NS, [1])
    assert key_hex(key) == key.hex()
    assert len(key_hex(key)) == 32
    assert key_from_hex(key_hex(key)) == key


@pytest.mark.parametrize("bad", [b"x" * 15, b"x" * 32, "x" * 16])
def test_key_hex_rejects_a_key_of_the_wrong_size(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^key:"):
        key_hex(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["ab", "AB" * 16, "zz" * 16])
def test_key_from_hex_rejects_malformed_text(bad: str) -> None:
    with pytest.raises(ValueError):
        key_from_hex(bad)


@given(
    st.lists(st.integers(0, TOKEN_MAX), max_size=60),
    st.lists(st.integers(0, 60), max_size=10),
)
def test_prefix_keys_equal_make_key_of_each_prefix(tokens: list[int], lengths: list[int]) -> None:
    lengths = [n for n in lengths if n <= len(tokens)]
    keys = prefix_keys(NS, encode_tokens(tokens), lengths)
    assert keys == [make_key(NS, tokens[:n]) for n in lengths]


def test_prefix_keys_reject_a_length_past_the_end() -> None:
    with pytest.raises(ValueError, match="outside"):
        prefix_keys(NS, encode_tokens([1, 2]), [3])


# ---------------------------------------------------------------- stride walk


def _walk(n_tokens: int, saved: set[int], stride: int, min_tokens: int) -> tuple[int, int]:
    tokens = list(range(n_tokens))
    keys = {make_key(NS, tokens[:n]): n for n in saved}
    found = stride_walk(NS, encode_tokens(tokens), stride, min_tokens, keys.__contains__)
    if found.key is not None:
        assert keys[found.key] == found.length
    return found.length, found.probes


def test_stride_walk_finds_the_longest_aligned_saved_prefix() -> None:
    assert _walk(10, {4, 8}, stride=4, min_tokens=1) == (8, 1)
    assert _walk(10, {4}, stride=4, min_tokens=1) == (4, 2)


def test_stride_walk_probes_the_whole_prompt_when_it_is_aligned() -> None:
    assert _walk(8, {8}, stride=4, min_tokens=1) == (8, 1)


def test_stride_walk_never_sees_unaligned_rows() -> None:
    assert _walk(10, {6, 7, 9, 10}, stride=4, min_tokens=1) == (0, 2)


def test_stride_walk_never_probes_below_max_of_min_tokens_and_stride() -> None:
    assert _walk(13, {4, 8}, stride=4, min_tokens=9) == (0, 1)  # probes 12 only
    assert _walk(13, {4}, stride=4, min_tokens=0) == (4, 3)  # 12, 8, 4; never 0
    assert _walk(3, {0}, stride=4, min_tokens=0) == (0, 0)


def test_stride_walk_with_the_default_stride_costs_14_probes_for_30k_tokens() -> None:
    assert _walk(30_000, set(), stride=2048, min_tokens=512) == (0, 14)


@pytest.mark.parametrize(("stride", "min_tokens"), [(0, 1), (-4, 1), (4, -1)])
def test_stride_walk_rejects_bad_parameters(stride: int, min_tokens: int) -> None:
    with pytest.raises(ValueError):
        stride_walk(NS, b"", stride, min_tokens, lambda _key: True)
