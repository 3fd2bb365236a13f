"""The deterministic stub backend: protocol parity, validation, determinism, pack format."""

from __future__ import annotations

import time

import numpy as np
import pytest

from erllama_py.errors import (
    CacheFormatError,
    ContextOverflowError,
    InvalidRequestError,
    ModelError,
)
from erllama_py.model.backend import Backend, Decode, Prefill, Sampled
from erllama_py.model.statebuf import KIND_STUB, StateBuffer, logits_of, parse_header
from erllama_py.model.stub_backend import STUB_BOS, STUB_EOS, StubBackend, stub_logits
from erllama_py.params import SamplingParams


@pytest.fixture
def stub() -> StubBackend:
    return StubBackend(n_vocab=1000, n_ctx=128, n_batch=64, n_seq_max=4)


def _generate(b: StubBackend, seq: int, sampler: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        r = b.step([Decode(seq, sampler)])[0]
        assert isinstance(r, Sampled)
        out.append(r.token)
    return out


def test_stub_satisfies_the_backend_protocol(stub: StubBackend) -> None:
    assert isinstance(stub, Backend)
    assert stub.info.backend == "stub"
    assert len(stub.info.fingerprint) == 32


def test_tokenize_is_a_stable_whitespace_hash_inside_the_vocabulary(stub: StubBackend) -> None:
    toks = stub.tokenize("hello  world\nhello")
    assert toks[0] == STUB_BOS
    assert toks[1] == toks[3] != toks[2]
    assert all(3 <= t < 1000 for t in toks[1:])
    assert StubBackend(n_vocab=1000).tokenize("hello world") == toks[:3]
    assert stub.tokenize("hello", add_special=False) == [toks[1]]


def test_detokenize_concatenates_pieces_and_renders_specials_empty(stub: StubBackend) -> None:
    toks = stub.tokenize("hello world")
    assert stub.detokenize(toks) == b" hello world"
    assert stub.detokenize(toks, special=True) == b"<s> hello world"
    assert stub.detokenize([*toks, STUB_EOS]) == b" hello world"
    assert StubBackend(n_vocab=1000).token_piece(777) == b" 777"  # never seen: decimal id
    assert stub.tokenize("<s> x", add_special=False, parse_special=True)[0] == STUB_BOS


def test_chat_template_renders_role_lines_and_validates(stub: StubBackend) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert stub.apply_chat_template(msgs) == "system: be brief\nuser: hi\n"
    with pytest.raises(InvalidRequestError):
        stub.apply_chat_template([{"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(InvalidRequestError):
        stub.apply_chat_template([{"content": "x"}])


def test_same_context_and_sampler_give_the_same_tokens(stub: StubBackend) -> None:
    g = stub.new_sampler(SamplingParams())
    toks = stub.tokenize("a b c")
    stub.step([Prefill(0, toks), Prefill(1, toks)])
    assert _generate(stub, 0, g, 10) == _generate(stub, 1, g, 10)
    assert stub.seq_len(0) == len(toks) + 10


def test_sampler_mixup_is_visible(stub: StubBackend) -> None:
    a = stub.new_sampler(SamplingParams(temperature=0.7, seed=1))
    b = stub.new_sampler(SamplingParams(temperature=0.7, seed=2))
    toks = stub.tokenize("a b c")
    stub.step([Prefill(0, toks), Prefill(1, toks)])
    assert _generate(stub, 0, a, 5) != _generate(stub, 1, b, 5)


def test_stop_and_resume_equals_one_uninterrupted_run(stub: StubBackend) -> None:
    cfg = SamplingParams(temperature=0.8, seed=7, repeat_penalty=1.1)
    toks = stub.tokenize("one two three")
    s1 = stub.new_sampler(cfg)
    stub.step([Prefill(0, toks)])
    whole = _generate(stub, 0, s1, 20)
    s2 = stub.new_sampler(cfg)
    stub.step([Prefill(1, toks)])
    first = _generate(stub, 1, s2, 8)
    with stub.pack(1) as buf:
        stub.clear_seq(1)
        assert stub.unpack(2, buf) == len(toks) + 8
    s3 = stub.new_sampler(cfg, history=stub.tokens(2))
    assert first + _generate(stub, 2, s3, 12) == whole


def test_co_batched_ops_return_results_in_op_order(stub: StubBackend) -> None:
    g = stub.new_sampler(SamplingParams())
    stub.step([Prefill(0, [5, 6])])
    res = stub.step([Prefill(1, [7, 8, 9]), Decode(0, g)])
    assert res[0] is None
    assert isinstance(res[1], Sampled)
    assert stub.seq_len(0) == 3
    assert stub.seq_len(1) == 3


def test_validation_matches_the_llama_backend(stub: StubBackend) -> None:
    g = stub.new_sampler(SamplingParams())
    with pytest.raises(InvalidRequestError):
        stub.step([Prefill(0, [1000])])
    with pytest.raises(InvalidRequestError):
        stub.step([Prefill(0, [-1])])
    with pytest.raises(InvalidRequestError):
        stub.step([Prefill(0, [])])
    with pytest.raises(InvalidRequestError):
        stub.step([Decode(0, g)])  # no logits yet
    with pytest.raises(InvalidRequestError):
        stub.step([Prefill(4, [5])])
    with pytest.raises(InvalidRequestError):
        stub.step([Prefill(0, [5] * 65)])  # > n_batch
    with pytest.raises(InvalidRequestError):
        stub.step([Prefill(0, [5]), Prefill(0, [6])])
    with pytest.raises(InvalidRequestError):
        stub.step([Decode(0, 999)])
    stub.step([Prefill(0, [5] * 60)])
    stub.step([Prefill(0, [5] * 40)])
    with pytest.raises(ContextOverflowError):
        stub.step([Prefill(0, [5] * 28)])  # 100 + 28 reaches n_ctx 128
    assert stub.seq_len(0) == 100


def test_context_overflow_leaves_room_for_one_token() -> None:
    b = StubBackend(n_vocab=100, n_ctx=16, n_batch=64, n_seq_max=2)
    with pytest.raises(ContextOverflowError):
        b.step([Prefill(0, [5] * 16)])
    b.step([Prefill(0, [5] * 15)])
    g = b.new_sampler(SamplingParams())
    b.step([Decode(0, g)])
    assert b.seq_len(0) == 16
    with pytest.raises(ContextOverflowError):
        b.step([Decode(0, g)])


def test_unified_kv_pool_is_shared_by_sequences() -> None:
    b = StubBackend(n_vocab=100, n_ctx=64, kv_size=64, n_batch=64, n_seq_max=2)
    b.step([Prefill(0, [5] * 40)])
    with pytest.raises(ContextOverflowError):
        b.step([Prefill(1, [5] * 30)])


def test_eog_after_n_tokens_is_reported_and_not_appended() -> None:
    b = StubBackend(n_vocab=100, eog_after=3)
    g = b.new_sampler(SamplingParams())
    b.step([Prefill(0, [5, 6])])
    res = [b.step([Decode(0, g)])[0] for _ in range(4)]
    assert [r.eog for r in res if r] == [False, False, False, True]
    assert res[3] == Sampled(STUB_EOS, True)
    assert b.seq_len(0) == 5
    assert b.has_logits(0)


def test_pack_format_holds_logits_and_token_list(stub: StubBackend) -> None:
    stub.step([Prefill(0, [5, 6, 7])])
    with stub.pack(0) as buf:
        h = parse_header(buf.view())
        assert h.kind == KIND_STUB
        assert h.n_tokens == 3
        assert h.has_logits
        assert np.array_equal(logits_of(buf.view(), h), stub_logits([5, 6, 7], 1000))
        state = bytes(buf.view()[h.state_offset :])
        assert np.frombuffer(state, dtype="<u4").tolist() == [5, 6, 7]


def test_pack_requires_logits_unless_allowed(stub: StubBackend) -> None:
    stub.step([Prefill(0, [5, 6, 7])])
    assert stub.truncate(0, 2)
    assert not stub.has_logits(0)
    with pytest.raises(InvalidRequestError):
        stub.pack(0)
    with stub.pack(0, allow_no_logits=True) as buf:
        assert stub.unpack(1, buf) == 2
    assert not stub.has_logits(1)
    assert stub.tokens(1) == [5, 6]


def test_unpack_detects_corruption_and_wrong_kind(stub: StubBackend) -> None:
    stub.step([Prefill(0, [5, 6, 7])])
    with stub.pack(0) as buf:
        data = bytearray(buf.view())
    data[-1] ^= 1  # change a token: logits no longer match
    with pytest.raises(CacheFormatError):
        stub.unpack(1, data)
    other = StubBackend(n_vocab=500)
    other.step([Prefill(0, [5])])
    with other.pack(0) as buf, pytest.raises(CacheFormatError):
        stub.unpack(1, buf)
    assert stub.seq_len(1) == 0


def test_swa_emulation_refuses_truncating_below_the_window() -> None:
    b = StubBackend(n_vocab=100, n_ctx=256, n_batch=256, n_swa=16)
    b.step([Prefill(0, list(range(3, 43)))])
    with b.pack(0) as buf:
        b.unpack(1, buf)
    assert b.seq_pos_min(1) == 40 - 16
    assert not b.truncate(1, 30)
    assert b.seq_len(1) == 40
    assert b.truncate(1, 40)
    assert b.truncate(0, 10)  # never restored: all cells present


def test_fail_hook_and_fail_on_step_inject_errors() -> None:
    seen: list[int] = []

    def hook(n: int, ops: object) -> None:
        seen.append(n)
        if n == 2:
            raise RuntimeError("boom")

    b = StubBackend(n_vocab=100, fail_hook=hook, fail_on_step=3)
    b.step([Prefill(0, [5])])
    with pytest.raises(RuntimeError):
        b.step([Prefill(1, [5])])
    with pytest.raises(ModelError):
        b.step([Prefill(2, [5])])
    assert seen == [1, 2, 3]


def test_step_delay_slows_every_step() -> None:
    b = StubBackend(n_vocab=100, step_delay=0.02)
    t = time.monotonic()
    b.step([Prefill(0, [5])])
    assert time.monotonic() - t >= 0.02


def test_samplers_and_embeddings(stub: StubBackend) -> None:
    s = stub.new_sampler(SamplingParams(grammar='root ::= "a"'))
    assert stub.n_samplers == 1
    stub.free_sampler(s)
    stub.free_sampler(s)
    assert stub.n_samplers == 0
    with pytest.raises(InvalidRequestError):
        stub.free_sampler(12345)
    with pytest.raises(InvalidRequestError):
        stub.new_sampler(SamplingParams(grammar="x ::= y"))
    e1, e2 = stub.embed([5, 6]), stub.embed([5, 7])
    assert len(e1) == 16
    assert e1 == stub.embed([5, 6])
    assert e1 != e2


def test_close_makes_further_calls_fail(stub: StubBackend) -> None:
    stub.close()
    stub.close()
    with pytest.raises(ModelError):
        stub.tokenize("x")


def test_stub_buffers_can_be_closed_by_the_receiver(stub: StubBackend) -> None:
    stub.step([Prefill(0, [5, 6])])
    buf = stub.pack(0)
    r = StateBuffer.from_fd(buf.fd)
    buf.close()
    assert stub.unpack(1, r) == 2
    r.close()
