"""StateBuffer (memfd + mmap) lifecycle and the packed-state header format."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from erllama_py.errors import CacheFormatError
from erllama_py.model.statebuf import (
    FLAG_LOGITS,
    HEADER_SIZE,
    KIND_LLAMA,
    KIND_STUB,
    MAGIC,
    StateBuffer,
    StateHeader,
    buffer_address,
    encode_header,
    logits_of,
    parse_header,
)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _map_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _packed(n_vocab: int = 8, state: bytes = b"abcdef", logits: bool = True) -> bytes:
    h = StateHeader(
        kind=KIND_LLAMA,
        n_tokens=3,
        n_vocab=n_vocab,
        logits_len=4 * n_vocab if logits else 0,
        state_len=len(state),
        flags=FLAG_LOGITS if logits else 0,
    )
    lg = np.arange(n_vocab, dtype=np.float32).tobytes() if logits else b""
    return encode_header(h) + lg + state


def test_header_round_trips_and_sections_are_where_the_header_says() -> None:
    data = _packed()
    h = parse_header(data)
    assert (h.kind, h.n_tokens, h.n_vocab, h.has_logits) == (KIND_LLAMA, 3, 8, True)
    assert h.state_offset == HEADER_SIZE + 32
    assert data[h.state_offset :] == b"abcdef"
    assert logits_of(data, h).tolist() == list(range(8))
    assert len(encode_header(h)) == HEADER_SIZE == 64
    assert data[:8] == MAGIC


def test_header_without_logits_has_an_empty_logits_section() -> None:
    h = parse_header(_packed(logits=False))
    assert not h.has_logits
    assert h.logits_len == 0
    assert h.state_offset == HEADER_SIZE


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        pytest.param(lambda b: b[:10], "truncated", id="short-header"),
        pytest.param(lambda b: b[:-1], "truncated", id="short-state"),
        pytest.param(lambda b: b + b"x", "trailing_bytes", id="trailing"),
        pytest.param(lambda b: b"X" + b[1:], "bad_magic", id="magic"),
        pytest.param(lambda b: b[:8] + b"\x02\x00" + b[10:], "unsupported_version", id="version"),
        pytest.param(lambda b: b[:10] + b"\x09\x00" + b[10 + 2 :], "bad_kind", id="kind"),
        pytest.param(lambda b: b[:12] + b"\x03\x00\x00\x00" + b[16:], "bad_header", id="flags"),
        pytest.param(lambda b: b[:28] + b"\x01" + b[29:], "bad_header", id="reserved"),
        pytest.param(lambda b: b[:32] + b"\x00" * 8 + b[40:], "bad_logits", id="logits-len"),
    ],
)
def test_strict_parser_rejects_each_malformation(mutate: object, reason: str) -> None:
    data = mutate(_packed())  # type: ignore[operator]
    with pytest.raises(CacheFormatError) as ei:
        parse_header(data)
    assert ei.value.reason == reason


@given(st.binary(max_size=200))
def test_parser_never_crashes_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(CacheFormatError):
        parse_header(data)


@given(st.integers(0, 63), st.integers(0, 255))
def test_any_single_header_byte_change_is_caught_or_harmless(pos: int, value: int) -> None:
    good = _packed()
    bad = bytearray(good)
    bad[pos] = value
    try:
        h = parse_header(bytes(bad))
    except CacheFormatError:
        return
    # Accepted only if it still describes a consistent buffer (e.g. n_tokens changed).
    assert h.total_size == len(bad)


def test_create_write_and_read_back_through_view_and_address() -> None:
    with StateBuffer.create(4096) as buf:
        assert buf.size == 4096
        assert buf.writable
        v = buf.view()
        v[:5] = b"hello"
        assert bytes(v[:5]) == b"hello"
        import ctypes

        assert ctypes.string_at(buf.address, 5) == b"hello"
        arr = buf.ctypes_array(0, 5)
        assert arr.raw == b"hello"
        del arr
    assert buf.closed
    buf.close()  # idempotent


def test_from_fd_dups_by_default_and_sees_the_same_pages() -> None:
    with StateBuffer.create(100) as a:
        a.view()[:3] = b"abc"
        with StateBuffer.from_fd(a.fd) as b:
            assert b.fd != a.fd
            assert not b.writable
            assert bytes(b.view()[:3]) == b"abc"
            a.view()[0:1] = b"X"
            assert bytes(b.view()[:1]) == b"X"  # shared mapping, no copy
            with pytest.raises(TypeError):
                b.view()[0:1] = b"Y"  # read-only
        os.fstat(a.fd)  # the original fd is still open


def test_from_fd_with_ownership_closes_the_callers_fd() -> None:
    a = StateBuffer.create(64)
    fd = os.dup(a.fd)
    b = StateBuffer.from_fd(fd, 64, take_ownership=True)
    b.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    a.close()


def test_from_fd_refuses_a_size_beyond_the_file() -> None:
    with StateBuffer.create(64) as a, pytest.raises(CacheFormatError) as ei:
        StateBuffer.from_fd(a.fd, 128)
    assert ei.value.reason == "truncated"


def test_sealed_buffer_cannot_be_shrunk_under_a_reader() -> None:
    with StateBuffer.create(4096) as a:
        a.seal()
        with pytest.raises(PermissionError):
            os.ftruncate(a.fd, 10)


def test_close_with_a_live_view_slice_raises_and_stays_usable() -> None:
    buf = StateBuffer.create(64)
    sl = buf.view()[1:4]
    with pytest.raises(BufferError):
        buf.close()
    assert not buf.closed
    del sl
    buf.close()
    assert buf.closed
    with pytest.raises(ValueError):
        buf.view()


def test_create_rejects_a_non_positive_size() -> None:
    with pytest.raises(ValueError):
        StateBuffer.create(0)


def test_buffer_address_works_for_read_only_bytes() -> None:
    import ctypes

    data = b"xyz"
    addr, keep = buffer_address(data)
    assert ctypes.string_at(addr, 3) == b"xyz"
    del keep


def test_another_process_reads_the_buffer_through_the_fd() -> None:
    with StateBuffer.create(_packed().__len__()) as buf:
        buf.view()[:] = _packed()
        buf.seal()
        code = (
            "import sys; from erllama_py.model.statebuf import StateBuffer, parse_header\n"
            "b = StateBuffer.from_fd(int(sys.argv[1]))\n"
            "h = parse_header(b.view()); print(h.n_tokens, h.n_vocab); b.close()\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(buf.fd)],
            pass_fds=(buf.fd,),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        assert out.stdout.split() == ["3", "8"]


def test_a_thousand_create_close_cycles_leak_no_fds_or_mappings() -> None:
    for _ in range(5):  # warm up allocator and caches
        StateBuffer.create(1 << 16).close()
    fds, maps = _fd_count(), _map_count()
    for i in range(1000):
        with StateBuffer.create(1 << 16) as b:
            b.view()[i % 100] = 1
            with StateBuffer.from_fd(b.fd) as r:
                assert r.view()[i % 100] == 1
    assert _fd_count() == fds
    assert _map_count() <= maps  # maps may merge, never grow


def test_garbage_collected_buffer_releases_its_fds() -> None:
    fds = _fd_count()
    for _ in range(50):
        StateBuffer.create(4096)  # dropped without close()
    assert _fd_count() == fds


def test_stub_kind_is_accepted_by_the_format() -> None:
    h = StateHeader(kind=KIND_STUB, n_tokens=2, n_vocab=4, logits_len=0, state_len=8)
    assert parse_header(encode_header(h) + b"\x00" * 8).kind == KIND_STUB
