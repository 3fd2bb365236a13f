"""LlamaBackend on real llama.cpp: the tiny GGUF in every run, gemma-3-270m when installed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from erllama_py.errors import (
    CacheFormatError,
    ConfigError,
    ContextOverflowError,
    InvalidRequestError,
    ModelError,
)
from erllama_py.model import llama_backend, llama_log
from erllama_py.model.backend import Backend, BackendInfo, Decode, Generate, Prefill, Sampled
from erllama_py.model.llama_backend import LlamaBackend, fingerprint_gguf
from erllama_py.model.statebuf import HEADER_SIZE, KIND_LLAMA, StateBuffer, parse_header
from erllama_py.model.stub_backend import StubBackend
from erllama_py.params import SamplingParams

PROMPT = "hello world the cat and the dog " * 6


def gen(b: LlamaBackend, seq: int, sampler: int, n: int) -> list[int]:
    """Decode ``n`` tokens on ``seq`` alone, one per step (stops early on EOG)."""
    out = []
    for _ in range(n):
        r = b.step([Decode(seq, sampler)])[0]
        assert isinstance(r, Sampled)
        out.append(r.token)
        if r.eog:
            break
    return out


def stored_logits(b: LlamaBackend, seq: int) -> np.ndarray:
    with b.pack(seq) as buf:
        h = parse_header(buf.view())
        return np.frombuffer(bytes(buf.view()[HEADER_SIZE : h.state_offset]), dtype=np.float32)


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if llama_decode is reached (monkeypatch undoes it afterwards)."""

    def boom(*_: object) -> int:
        raise AssertionError("llama_decode must not be called")

    monkeypatch.setattr(llama_backend._L, "llama_decode", boom)


# ---------------------------------------------------------------- model info


def test_info_describes_the_tiny_model(tiny: LlamaBackend, tiny_model_path: Path) -> None:
    info = tiny.info
    assert isinstance(tiny, Backend)
    assert info.backend == "llama"
    assert info.architecture == "llama"
    assert info.quant == "f32"
    assert (info.bos, info.eos, info.eog) == (1, 2, (2, 4))
    assert info.add_bos
    assert info.add_space_prefix
    assert info.n_swa == 0
    assert info.n_embd == 64
    assert (info.n_ctx, info.kv_size, info.n_batch, info.n_seq_max) == (512, 2048, 256, 4)
    assert info.ctx_params["n_stream"] == 4  # one KV stream per sequence
    assert info.chat_template is not None
    assert "<|im_start|>" in info.chat_template
    assert info.file_size == tiny_model_path.stat().st_size
    assert len(info.fingerprint) == 32
    assert set(info.ctx_params) == {
        "type_k",
        "type_v",
        "flash_attn",
        "kv_unified",
        "n_stream",
        "swa_full",
    }
    d = json.loads(json.dumps(info.to_dict()))
    assert BackendInfo.from_dict(d) == info


def test_fingerprint_is_stable_and_sensitive_to_content(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    from erllama_py.model.testmodel import write_test_model

    fp = fingerprint_gguf(tiny_model_path)
    assert fp == fingerprint_gguf(tiny_model_path)
    other = write_test_model(tmp_path / "other.gguf", seed=1)
    assert fingerprint_gguf(other) != fp
    assert fingerprint_gguf(tiny_model_path, full=True) != fp  # another domain


def test_bad_options_raise_config_error(tiny_model_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_ctx"):
        LlamaBackend.load(tiny_model_path, n_ctx=0)
    with pytest.raises(ConfigError, match="type_k"):
        LlamaBackend.load(tiny_model_path, type_k="f8")
    with pytest.raises(ConfigError, match="n_ubatch"):
        LlamaBackend.load(tiny_model_path, n_batch=64, n_ubatch=128)


# ------------------------------------------------------------- tokenizer


def test_tokenize_detokenize_round_trip(tiny: LlamaBackend) -> None:
    text = "hello world, the cat: naïve ✓ ok"
    toks = tiny.tokenize(text)
    assert toks[0] == 1  # BOS
    # SPM with add_space_prefix: the tokenizer's leading space comes back.
    assert tiny.detokenize(toks) == b" " + text.encode()
    assert tiny.detokenize(toks[1:]) == b" " + text.encode()
    assert tiny.tokenize(text, add_special=False) == toks[1:]
    pieces = b"".join(tiny.token_piece(t) for t in toks)
    assert pieces == tiny.detokenize(toks)
    assert tiny.detokenize([1, 2], special=True) == b"<s></s>"
    assert tiny.detokenize([1, 2]) == b""


def test_detokenize_can_end_inside_a_utf8_character(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize("✓", add_special=False)
    partial = tiny.detokenize(toks[:-1])
    with pytest.raises(UnicodeDecodeError):
        partial.decode("utf-8")
    assert tiny.detokenize(toks).decode("utf-8") == " ✓"


def test_parse_special_turns_marker_text_into_control_tokens(tiny: LlamaBackend) -> None:
    assert tiny.tokenize("<|im_start|>", add_special=False, parse_special=True) == [3]
    assert 3 not in tiny.tokenize("<|im_start|>", add_special=False)


def test_detokenize_validates_ids(tiny: LlamaBackend) -> None:
    with pytest.raises(InvalidRequestError):
        tiny.detokenize([tiny.info.n_vocab])
    with pytest.raises(InvalidRequestError):
        tiny.token_piece(-1)


# ---------------------------------------------------------- chat template


def test_chat_template_uses_the_models_own_template(tiny: LlamaBackend) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tiny.apply_chat_template(msgs)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not tiny.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")
    assert tiny.apply_chat_template(msgs, template="gemma").startswith("<start_of_turn>user\n")


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([], id="empty"),
        pytest.param([{"content": "x"}], id="no-role"),
        pytest.param([{"role": "user"}], id="no-content"),
        pytest.param([{"role": "user", "content": [{"type": "text", "text": "x"}]}], id="blocks"),
        pytest.param(["hello"], id="not-a-mapping"),
    ],
)
def test_bad_chat_messages_raise_invalid_request(
    tiny: LlamaBackend, messages: list[object]
) -> None:
    with pytest.raises(InvalidRequestError):
        tiny.apply_chat_template(messages)  # type: ignore[arg-type]


def test_unknown_template_raises_invalid_request(tiny: LlamaBackend) -> None:
    with pytest.raises(InvalidRequestError, match="template"):
        tiny.apply_chat_template([{"role": "user", "content": "x"}], template="no-such-thing")


# ----------------------------------------------------------- step semantics


def test_prefill_then_decode_puts_each_token_in_kv(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    g = tiny.new_sampler(SamplingParams())
    assert not tiny.has_logits(0)
    assert tiny.step([Prefill(0, toks)]) == [None]
    assert tiny.seq_len(0) == len(toks)
    assert tiny.has_logits(0)
    for i in range(1, 6):
        (r,) = tiny.step([Decode(0, g)])
        assert isinstance(r, Sampled)
        assert not r.eog
        assert tiny.seq_len(0) == len(toks) + i
        assert int(llama_backend._L.llama_memory_seq_pos_max(tiny._mem, 0)) == len(toks) + i - 1


def test_greedy_is_deterministic_across_sequences_and_loads(
    tiny: LlamaBackend, tiny_model_path: Path
) -> None:
    toks = tiny.tokenize(PROMPT)
    g = tiny.new_sampler(SamplingParams())
    tiny.step([Prefill(0, toks)])
    a = gen(tiny, 0, g, 15)
    tiny.step([Prefill(2, toks)])
    assert gen(tiny, 2, g, 15) == a
    with LlamaBackend.load(tiny_model_path, n_ctx=512, n_batch=256, n_threads=2) as other:
        g2 = other.new_sampler(SamplingParams())
        other.step([Prefill(1, toks)])
        assert gen(other, 1, g2, 15) == a
    assert len(set(a)) > 1


def test_co_batched_prefill_and_decode_return_results_in_op_order(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    g = tiny.new_sampler(SamplingParams())
    tiny.step([Prefill(0, toks)])
    res = tiny.step([Prefill(1, toks[:10]), Decode(0, g), Prefill(2, toks[:5])])
    assert res[0] is None
    assert isinstance(res[1], Sampled)
    assert res[2] is None
    assert [tiny.seq_len(s) for s in range(3)] == [len(toks) + 1, 10, 5]
    res = tiny.step([Decode(1, g), Decode(0, g)])
    assert all(isinstance(r, Sampled) for r in res)


def sampled(results: list[Sampled | None]) -> list[int]:
    assert all(isinstance(r, Sampled) for r in results)
    return [r.token for r in results if isinstance(r, Sampled)]


def _ubatches_of_a_decode(
    path: Path, monkeypatch: pytest.MonkeyPatch, orders: list[list[int]]
) -> list[tuple[int, list[int]]]:
    """For each order of seqs: how many ubatches llama.cpp split one step of those
    seqs' generate ops into, and the tokens sampled, by seq."""
    monkeypatch.setenv("LLAMA_BATCH_DEBUG", "1")  # read when the context is created
    b = LlamaBackend.load(path, n_ctx=512, n_batch=256, n_seq_max=4, n_threads=2)
    out: list[tuple[int, list[int]]] = []
    try:
        toks = b.tokenize(PROMPT)
        for order in orders:
            for seq in range(4):
                b.clear_seq(seq)
            b.step([Prefill(seq, toks[: 5 + 3 * seq]) for seq in range(4)])
            samplers = {seq: b.new_sampler(SamplingParams()) for seq in order}
            first = sampled(b.step([Generate(seq, samplers[seq], None) for seq in order]))
            ops = [Generate(seq, samplers[seq], t) for seq, t in zip(order, first, strict=True)]
            with llama_log.capture(llama_log.LEVEL_DEBUG) as cap:
                res = sampled(b.step(ops))
            by_seq = dict(zip(order, res, strict=True))
            n = sum("added ubatch" in line for line in cap.lines)
            out.append((n, [by_seq[s] for s in sorted(by_seq)]))
            for sampler in samplers.values():
                b.free_sampler(sampler)
    finally:
        b.close()
    return out


def test_co_batched_decodes_share_one_ubatch_in_any_op_order(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a unified KV cache llama.cpp puts sequences in one ubatch (one pass
    # over the weights) only while their ids are consecutive in batch order: the
    # backend sorts the batch, so four decodes given in any order are one pass.
    (asc, asc_tokens), (mixed, mixed_tokens), (gap, _) = _ubatches_of_a_decode(
        tiny_model_path, monkeypatch, [[0, 1, 2, 3], [3, 1, 0, 2], [0, 2]]
    )
    assert asc == 1
    assert mixed == 1
    assert mixed_tokens == asc_tokens  # results come back in op order
    # Ids with a gap cost one pass per run of consecutive ids: why the model actor
    # hands out the lowest free sequence first.
    assert gap == 2


@pytest.mark.parametrize("kind", ["llama", "stub"])
def test_a_moved_sequence_continues_exactly_from_its_new_id(
    kind: str, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "stub":
        b: Backend = StubBackend(n_ctx=512, n_batch=256, n_seq_max=4)
    else:
        monkeypatch.setenv("LLAMA_BATCH_DEBUG", "1")
        b = LlamaBackend.load(tiny_model_path, n_ctx=512, n_batch=256, n_seq_max=4, n_threads=2)
    try:
        toks = b.tokenize(PROMPT)
        g = b.new_sampler(SamplingParams())
        b.step([Prefill(2, toks)])
        expected = gen(b, 2, g, 12)  # type: ignore[arg-type]
        b.clear_seq(2)
        b.step([Prefill(2, toks)])
        head = gen(b, 2, g, 4)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError):
            b.move_seq(2, 2)
        b.step([Prefill(1, toks[:3])])
        with pytest.raises(InvalidRequestError):
            b.move_seq(2, 1)  # in use
        b.clear_seq(1)
        b.move_seq(2, 1)
        assert b.seq_len(2) == 0 and not b.has_logits(2)
        assert b.seq_len(1) == len(toks) + 4
        assert head + gen(b, 1, g, 8) == expected  # type: ignore[arg-type]
        if kind == "llama":
            # moved next to seq 0, the two decode in one pass
            b.step([Prefill(0, toks[:9])])
            g0 = b.new_sampler(SamplingParams())
            t0, t1 = sampled(b.step([Generate(0, g0, None), Generate(1, g, None)]))
            with llama_log.capture(llama_log.LEVEL_DEBUG) as cap:
                b.step([Generate(0, g0, t0), Generate(1, g, t1)])
            assert sum("added ubatch" in line for line in cap.lines) == 1
    finally:
        b.close()


def test_logits_survive_decodes_of_other_sequences(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    g = tiny.new_sampler(SamplingParams())
    tiny.step([Prefill(0, toks)])
    expected = stored_logits(tiny, 0)
    tiny.step([Prefill(1, toks[:7])])  # overwrites the context's output rows
    gen(tiny, 1, g, 3)
    assert np.array_equal(stored_logits(tiny, 0), expected)
    tiny.step([Prefill(2, toks)])
    first_2 = gen(tiny, 2, g, 1)
    assert gen(tiny, 0, g, 1) == first_2


def test_invalid_ops_raise_before_llama_cpp_is_called(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    g = tiny.new_sampler(SamplingParams())
    tiny.step([Prefill(0, toks)])
    n = tiny.info.n_vocab
    bad = [
        [Prefill(1, [n])],
        [Prefill(1, [-5])],
        [Prefill(1, [])],
        [Prefill(1, [1.5])],  # type: ignore[list-item]
        [Prefill(9, [5])],
        [Prefill(True, [5])],  # type: ignore[arg-type]
        [Decode(1, g)],  # seq 1 has no logits
        [Decode(0, 999)],  # unknown sampler
        [Prefill(0, [5]), Decode(0, g)],  # same seq twice
        [Prefill(1, [5] * 257)],  # > n_batch 256
        ["not an op"],
    ]
    for ops in bad:
        with pytest.raises(InvalidRequestError):
            tiny.step(ops)  # type: ignore[arg-type]
    assert tiny.seq_len(0) == len(toks)
    assert tiny.seq_len(1) == 0
    assert tiny.step([]) == []


def test_validation_happens_before_llama_decode(tiny_model_path: Path, no_decode: None) -> None:
    with LlamaBackend.load(tiny_model_path, n_ctx=64, n_batch=64) as b:
        with pytest.raises(InvalidRequestError):
            b.step([Prefill(0, [b.info.n_vocab + 10])])
        with pytest.raises(ContextOverflowError):
            b.step([Prefill(0, [5] * 64)])
        with pytest.raises(InvalidRequestError):
            b.step([Decode(0, b.new_sampler(SamplingParams()))])
        assert b.seq_len(0) == 0


def test_context_overflow_leaves_room_for_one_generated_token(tiny_model_path: Path) -> None:
    with LlamaBackend.load(tiny_model_path, n_ctx=64, n_batch=64, n_threads=2) as b:
        g = b.new_sampler(SamplingParams())
        with pytest.raises(ContextOverflowError):
            b.step([Prefill(0, [5] * 64)])
        b.step([Prefill(0, [5] * 63)])
        b.step([Decode(0, g)])
        assert b.seq_len(0) == 64
        with pytest.raises(ContextOverflowError):
            b.step([Decode(0, g)])
        assert b.seq_len(0) == 64


def test_each_sequence_has_n_ctx_unless_the_kv_cache_is_unified(tiny_model_path: Path) -> None:
    with LlamaBackend.load(
        tiny_model_path, n_ctx=128, n_batch=128, n_seq_max=2, kv_unified=True
    ) as b:
        assert b.info.kv_size == 128
        b.step([Prefill(0, [5] * 100)])
        with pytest.raises(ContextOverflowError, match="KV cache is full"):
            b.step([Prefill(1, [5] * 100)])
    with LlamaBackend.load(tiny_model_path, n_ctx=128, n_batch=128, n_seq_max=2) as b:
        assert b.info.kv_size == 256
        b.step([Prefill(0, [5] * 100), Prefill(1, [6] * 27)])
        b.step([Prefill(1, [6] * 73)])
        assert (b.seq_len(0), b.seq_len(1)) == (100, 100)


def test_failed_decode_raises_and_drops_the_batch_sequences_logits(
    tiny: LlamaBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    toks = tiny.tokenize(PROMPT)
    g = tiny.new_sampler(SamplingParams())
    tiny.step([Prefill(0, toks), Prefill(1, toks)])
    monkeypatch.setattr(llama_backend._L, "llama_decode", lambda *_: 1)  # "no KV slot"
    with pytest.raises(ModelError, match="status 1"):
        tiny.step([Decode(0, g)])
    monkeypatch.undo()
    assert tiny.seq_len(0) == len(toks)
    assert not tiny.has_logits(0)
    assert tiny.has_logits(1)  # not in the failed batch: its logits were kept
    gen(tiny, 1, g, 2)


def placement_diffs(b: LlamaBackend, toks: list[int], neighbour: list[int]) -> tuple[float, float]:
    """Max logit difference caused by other sequences' cells: (prefill, decode after restore)."""
    b.step([Prefill(0, toks)])
    alone = stored_logits(b, 0)
    b.step([Prefill(1, toks)])  # the same tokens while seq 0 holds cells
    prefill_diff = float(np.abs(stored_logits(b, 1) - alone).max())
    with b.pack(0) as buf:
        for seq in range(4):
            b.clear_seq(seq)
        b.unpack(1, buf)
        g = b.new_sampler(SamplingParams())
        ref = []
        for _ in range(6):
            ref.append(stored_logits(b, 1))
            gen(b, 1, g, 1)
        prefill(b, 0, neighbour)  # a neighbour, then the same state elsewhere
        b.unpack(3, buf)
    decode_diff = 0.0
    for want in ref:
        decode_diff = max(decode_diff, float(np.abs(stored_logits(b, 3) - want).max()))
        gen(b, 3, g, 1)
    for seq in range(4):
        b.clear_seq(seq)
    return prefill_diff, decode_diff


def test_per_sequence_streams_make_logits_independent_of_other_sequences(
    tiny: LlamaBackend, tiny_model_path: Path
) -> None:
    toks = tiny.tokenize(PROMPT)
    other = tiny.tokenize(PROMPT * 6)[:300]
    assert placement_diffs(tiny, toks, other) == (0.0, 0.0)
    with LlamaBackend.load(tiny_model_path, n_ctx=512, n_batch=256, kv_unified=True) as uni:
        diffs = placement_diffs(uni, toks, other)
        print(f"\ntiny model, unified KV cache: max logit differences {diffs}")


# ------------------------------------------------------------------- sampling


def test_both_sampling_paths_give_identical_tokens(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks)])
    for cfg in (
        SamplingParams(),
        SamplingParams(temperature=0.9, seed=11, top_k=20, top_p=0.95, min_p=0.01),
        SamplingParams(temperature=1.5, seed=3, repeat_penalty=1.3),
    ):
        for _ in range(4):
            pos = tiny.seq_len(0)
            logits = stored_logits(tiny, 0).copy()
            a = tiny.new_sampler(cfg, history=toks)
            b = tiny.new_sampler(cfg, history=toks)
            via_numpy = tiny.sample_logits(b, logits, pos)
            (r,) = tiny.step([Decode(0, a)])  # via llama_sampler_sample on the context
            assert isinstance(r, Sampled)
            assert r.token == via_numpy


def test_draw_seed_is_a_stable_32_bit_function_of_seed_and_position() -> None:
    from erllama_py.model.sampling import LLAMA_DEFAULT_SEED, draw_seed

    seeds = [draw_seed(7, p) for p in range(1000)]
    assert seeds == [draw_seed(7, p) for p in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= x < LLAMA_DEFAULT_SEED for x in seeds)
    assert draw_seed(8, 0) != draw_seed(7, 0)
    assert draw_seed(2**64 - 1, 2**40) >= 0


def test_seeded_draw_depends_on_position_not_on_draw_count(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks)])
    logits = stored_logits(tiny, 0)
    cfg = SamplingParams(temperature=2.0, seed=5)
    s1 = tiny.new_sampler(cfg)
    for p in range(5):
        tiny.sample_logits(s1, logits, p)  # advance s1 by five draws
    s2 = tiny.new_sampler(cfg)
    assert [tiny.sample_logits(s1, logits, p) for p in range(40, 60)] == [
        tiny.sample_logits(s2, logits, p) for p in range(40, 60)
    ]
    s3 = tiny.new_sampler(SamplingParams(temperature=2.0, seed=6))
    assert len({tiny.sample_logits(s3, logits, p) for p in range(40, 60)}) > 1


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(SamplingParams(), id="greedy"),
        pytest.param(SamplingParams(temperature=0.8, seed=42), id="temp0.8-seed"),
        pytest.param(SamplingParams(temperature=0.8, seed=42, repeat_penalty=1.1), id="penalty"),
        pytest.param(SamplingParams(repeat_penalty=1.1), id="greedy-penalty"),
    ],
)
def test_stop_and_resume_gives_the_tokens_of_one_run(
    tiny: LlamaBackend, cfg: SamplingParams
) -> None:
    assert_stop_and_resume_exact(tiny, tiny.tokenize(PROMPT), cfg)


def assert_stop_and_resume_exact(b: LlamaBackend, toks: list[int], cfg: SamplingParams) -> None:
    s = b.new_sampler(cfg, history=toks)
    b.step([Prefill(0, toks)])
    whole = gen(b, 0, s, 20)
    s = b.new_sampler(cfg, history=toks)
    b.step([Prefill(1, toks)])
    first = gen(b, 1, s, 8)
    with b.pack(1) as buf:
        b.clear_seq(1)
        assert b.unpack(2, buf) == len(toks) + 8
    resumed = b.new_sampler(cfg, history=toks + first)  # the context: prompt + generated
    rest = gen(b, 2, resumed, 12)
    assert first + rest == whole
    for seq in (0, 1, 2):
        b.clear_seq(seq)


def test_penalty_window_is_primed_with_history(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks)])
    logits = stored_logits(tiny, 0)
    top = int(np.argmax(logits))
    cfg = SamplingParams(repeat_penalty=100.0)
    plain = tiny.new_sampler(cfg)
    primed = tiny.new_sampler(cfg, history=[top])
    assert tiny.sample_logits(plain, logits, 0) == top
    assert tiny.sample_logits(primed, logits, 0) != top
    late = tiny.new_sampler(cfg)
    tiny.prime_sampler(late, [top])
    assert tiny.sample_logits(late, logits, 0) != top


def test_grammar_constrains_output_and_ends_with_eog(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks)])
    before = stored_logits(tiny, 0)
    for cfg in (
        SamplingParams(grammar='root ::= "yes" | "no"'),
        SamplingParams(grammar='root ::= "yes" | "no"', temperature=1.0, seed=9),
    ):
        tiny.clear_seq(0)
        tiny.step([Prefill(0, toks)])
        s = tiny.new_sampler(cfg)
        out = gen(tiny, 0, s, 10)
        assert out[-1] in tiny.info.eog
        assert tiny.detokenize(out[:-1]) in (b"yes", b"no")
        assert tiny.seq_len(0) == len(toks) + len(out) - 1  # EOG not decoded
        assert tiny.has_logits(0)
    # the EOG decode kept the logits it was sampled from, also beside another seq's decode
    tiny.clear_seq(0)
    tiny.step([Prefill(0, toks), Prefill(1, toks)])
    s = tiny.new_sampler(SamplingParams(grammar='root ::= "yes" | "no"'))
    g = tiny.new_sampler(SamplingParams())
    while True:
        r0, _ = tiny.step([Decode(0, s), Decode(1, g)])
        assert isinstance(r0, Sampled)
        if r0.eog:
            break
        kept = stored_logits(tiny, 0)
    assert np.array_equal(stored_logits(tiny, 0), kept)
    assert not np.array_equal(kept, before)


@pytest.mark.parametrize(
    "grammar",
    [
        "root ::= foo",
        'x ::= "a"',
        "root ::= root",
        'root ::= "unterminated',
        "root ::= [a-",
    ],
)
def test_invalid_grammar_raises_invalid_request(tiny: LlamaBackend, grammar: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid grammar") as ei:
        tiny.new_sampler(SamplingParams(grammar=grammar))
    assert ei.value.param == "grammar"
    assert tiny.n_samplers == 0


def test_grammar_with_an_empty_alternative_is_valid(tiny: LlamaBackend) -> None:
    # llama.cpp accepts it: root may be empty, and then only an EOG token may follow.
    tiny.free_sampler(tiny.new_sampler(SamplingParams(grammar='root ::= "yes" | ')))


_DEAD_END = r"""
import sys
import numpy as np
from erllama_py.errors import InvalidRequestError
from erllama_py.params import SamplingParams
from erllama_py.model.llama_backend import LlamaBackend

b = LlamaBackend.load(sys.argv[1], n_ctx=128, n_batch=64)
s = b.new_sampler(SamplingParams(grammar='root ::= "yes"'))
logits = np.full(b.info.n_vocab, -np.inf, dtype=np.float32)
logits[b.tokenize("hello", add_special=False)[0]] = 1.0  # the only finite token is banned
try:
    b.sample_logits(s, logits, 0)
except InvalidRequestError as e:
    print("raised:", e)
"""


def test_grammar_dead_end_raises_instead_of_aborting(
    tiny_model_path: Path, run_python: object
) -> None:
    # Accepting a token the grammar bans makes llama.cpp throw through its C API
    # (std::terminate, SIGABRT): run where an abort cannot take pytest down.
    proc = run_python(_DEAD_END, str(tiny_model_path))  # type: ignore[operator]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised: the grammar allows no token" in proc.stdout


def test_json_schema_output_parses(tiny: LlamaBackend) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
    }
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks)])
    s = tiny.new_sampler(SamplingParams.from_dict({"json_schema": schema}))
    out = gen(tiny, 0, s, 60)
    assert out[-1] in tiny.info.eog
    assert json.loads(tiny.detokenize(out[:-1])) in ({"ok": True}, {"ok": False})


def test_sampler_config_validation() -> None:
    for kw in (
        {"temperature": -1},
        {"temperature": float("nan")},
        {"top_p": 0},
        {"min_p": 2},
        {"repeat_penalty": 0},
        {"top_k": -1},
        {"seed": -1},
        {"seed": 1.5},
        {"grammar": ""},
        {"json_schema": "{not json"},
        {"grammar": 'root ::= "a"', "json_schema": "{}"},
    ):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        SamplingParams.from_dict({"temprature": 1})


def test_samplers_are_freed_and_unknown_ids_refused(tiny: LlamaBackend) -> None:
    ids = [tiny.new_sampler(SamplingParams(temperature=1.0)) for _ in range(5)]
    assert tiny.n_samplers == 5
    for i in ids:
        tiny.free_sampler(i)
    tiny.free_sampler(ids[0])
    assert tiny.n_samplers == 0
    with pytest.raises(InvalidRequestError):
        tiny.free_sampler(10**6)
    with pytest.raises(InvalidRequestError):
        tiny.new_sampler(SamplingParams(), history=[tiny.info.n_vocab])
    from_ipc = tiny.new_sampler({"temperature": 0.5, "seed": 3})  # a mapping is accepted
    tiny.free_sampler(from_ipc)
    with pytest.raises(InvalidRequestError):
        tiny.new_sampler({"temperature": 0.5, "sead": 3})


# ---------------------------------------------------------- truncate / clear


def test_truncate_drops_logits_and_allows_re_prefill(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    g = tiny.new_sampler(SamplingParams())
    tiny.step([Prefill(0, toks)])
    assert tiny.truncate(0, len(toks))  # no-op keeps logits
    assert tiny.has_logits(0)
    assert tiny.truncate(0, 10)
    assert tiny.seq_len(0) == 10
    assert not tiny.has_logits(0)
    with pytest.raises(InvalidRequestError):
        tiny.step([Decode(0, g)])
    with pytest.raises(InvalidRequestError):
        tiny.truncate(0, 11)
    tiny.step([Prefill(0, toks[10:])])
    assert tiny.seq_len(0) == len(toks)
    assert int(llama_backend._L.llama_memory_seq_pos_max(tiny._mem, 0)) == len(toks) - 1
    tiny.clear_seq(0)
    assert tiny.seq_len(0) == 0
    assert tiny.seq_pos_min(0) == -1


# ------------------------------------------------------------- pack / unpack


def test_pack_seq0_unpack_seq1_continues_exactly(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    g = tiny.new_sampler(SamplingParams())
    tiny.step([Prefill(0, toks)])
    with tiny.pack(0) as buf:
        h = parse_header(buf.view())
        assert (h.kind, h.n_tokens, h.n_vocab, h.has_logits) == (
            KIND_LLAMA,
            len(toks),
            tiny.info.n_vocab,
            True,
        )
        assert tiny.unpack(1, buf) == len(toks)
    assert tiny.has_logits(1)
    assert tiny.seq_len(1) == len(toks)
    assert gen(tiny, 1, g, 12) == gen(tiny, 0, g, 12)


def test_unpack_from_bytes_and_from_a_received_fd(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks)])
    buf = tiny.pack(0)
    data = bytes(buf.view())
    received = StateBuffer.from_fd(buf.fd)
    buf.close()
    assert tiny.unpack(1, data) == len(toks)
    assert tiny.unpack(2, received) == len(toks)
    received.close()  # logits were copied: closing right away is fine
    g = tiny.new_sampler(SamplingParams())
    assert gen(tiny, 1, g, 5) == gen(tiny, 2, g, 5)


def test_pack_unpack_cycles_leak_no_fds(tiny: LlamaBackend) -> None:
    tiny.step([Prefill(0, tiny.tokenize(PROMPT))])
    for _ in range(3):
        with tiny.pack(0) as buf:
            tiny.unpack(1, buf)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        with tiny.pack(0) as buf:
            tiny.unpack(1, buf)
        tiny.unpack(2, bytes(tiny.pack(0).view()))  # an unclosed buffer is collected
    assert len(os.listdir("/proc/self/fd")) == fds


def test_unpack_clears_the_target_sequence_first(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks[:10]), Prefill(1, toks)])
    with tiny.pack(0) as buf:
        tiny.unpack(1, buf)
    assert tiny.seq_len(1) == 10
    assert tiny.seq_pos_min(1) == 0


def test_pack_refuses_a_sequence_without_logits_unless_allowed(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks)])
    tiny.truncate(0, 20)
    with pytest.raises(InvalidRequestError):
        tiny.pack(0)
    with tiny.pack(0, allow_no_logits=True) as buf:
        assert not parse_header(buf.view()).has_logits
        assert tiny.unpack(1, buf) == 20
    assert not tiny.has_logits(1)
    tiny.step([Prefill(1, toks[20:21])])
    assert tiny.has_logits(1)


def test_unpack_rejects_bad_buffers_and_leaves_the_seq_empty(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks), Prefill(1, toks[:5])])
    with tiny.pack(0) as buf:
        good = bytearray(buf.view())
    h = parse_header(good)

    def expect(data: bytes | bytearray, reason: str) -> None:
        with pytest.raises(CacheFormatError) as ei:
            tiny.unpack(1, data)
        assert ei.value.reason == reason

    expect(good[:-1], "truncated")
    expect(good[:HEADER_SIZE], "truncated")
    wrong_n = bytearray(good)
    wrong_n[16:24] = (len(toks) + 3).to_bytes(8, "little")  # header claims more tokens
    expect(wrong_n, "state_mismatch")
    assert tiny.seq_len(1) == 0
    cut = bytearray(good[: h.state_offset + h.state_len // 2])
    cut[40:48] = (h.state_len // 2).to_bytes(8, "little")
    expect(cut, "unpack_failed")
    assert tiny.seq_len(1) == 0
    assert tiny.seq_pos_min(1) == -1
    stub = StubBackend(n_vocab=tiny.info.n_vocab)
    stub.step([Prefill(0, [5, 6])])
    with stub.pack(0) as sbuf:
        expect(bytes(sbuf.view()), "bad_kind")
    stub2 = StubBackend(n_vocab=100)
    stub2.step([Prefill(0, [5, 6])])
    # a stub buffer relabelled as a llama state: llama.cpp rejects the bytes
    with stub2.pack(0) as sbuf:
        relabelled = bytearray(sbuf.view())
    relabelled[10:12] = KIND_LLAMA.to_bytes(2, "little")
    expect(relabelled, "vocab_mismatch")


def test_states_move_between_compatible_contexts_only(
    tiny: LlamaBackend, tiny_model_path: Path
) -> None:
    toks = tiny.tokenize(PROMPT)
    tiny.step([Prefill(0, toks)])
    g = tiny.new_sampler(SamplingParams())
    with tiny.pack(0) as buf:
        with LlamaBackend.load(tiny_model_path, n_ctx=1024, n_batch=64, n_seq_max=4) as other:
            assert other.unpack(1, buf) == len(toks)  # another n_ctx and n_batch: fine
            g2 = other.new_sampler(SamplingParams())
            assert gen(other, 1, g2, 6) == gen(tiny, 0, g, 6)
        with LlamaBackend.load(tiny_model_path, n_ctx=512, flash_attn=False) as no_fa:
            with pytest.raises(CacheFormatError) as ei:
                no_fa.unpack(0, buf)
            assert ei.value.reason == "unpack_failed"
            assert "transposition" in ei.value.detail
            assert no_fa.seq_len(0) == 0
        for kw in ({"n_seq_max": 2}, {"kv_unified": True}):
            with (
                LlamaBackend.load(tiny_model_path, n_ctx=512, **kw) as other,  # type: ignore[arg-type]
                pytest.raises(CacheFormatError, match="n_stream"),
            ):
                other.unpack(0, buf)


# ----------------------------------------------------------------- embed/close


def test_embed_is_deterministic_and_leaves_sequences_alone(tiny: LlamaBackend) -> None:
    toks = tiny.tokenize(PROMPT)
    g = tiny.new_sampler(SamplingParams())
    tiny.step([Prefill(0, toks)])
    e1 = tiny.embed(toks[:20])
    assert len(e1) == tiny.info.n_embd
    assert e1 == tiny.embed(toks[:20])
    assert e1 != tiny.embed(toks[:21])
    assert tiny.seq_len(0) == len(toks)
    tiny.step([Prefill(1, toks)])
    assert gen(tiny, 0, g, 5) == gen(tiny, 1, g, 5)
    with pytest.raises(InvalidRequestError):
        tiny.embed([5] * 257)


def test_close_is_idempotent_and_later_calls_fail(tiny_model_path: Path) -> None:
    b = LlamaBackend.load(tiny_model_path, n_ctx=128, n_batch=64)
    b.new_sampler(SamplingParams(grammar='root ::= "a"'))
    b.embed([5, 6])
    b.close()
    b.close()
    with pytest.raises(ModelError):
        b.tokenize("x")
    with pytest.raises(ModelError):
        b.step([Prefill(0, [5])])


def test_llama_cpp_info_lines_are_not_printed(
    tiny_model_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    LlamaBackend.load(tiny_model_path, n_ctx=128, n_batch=64).close()
    assert "llama_model_loader" not in capfd.readouterr().err


# ============================================================ gemma-3-270m


def gemma_prompt(b: LlamaBackend, n: int) -> list[int]:
    text = (
        "The history of the old harbour town begins with a handful of fishing families who "
        "settled on the river mouth. Over the centuries merchants, sailors and craftsmen came. "
    ) * (n // 20 + 2)
    toks = b.tokenize(text)[:n]
    assert len(toks) == n
    return toks


def prefill(b: LlamaBackend, seq: int, toks: list[int]) -> None:
    nb = b.info.n_batch
    for i in range(0, len(toks), nb):
        b.step([Prefill(seq, toks[i : i + nb])])


@pytest.mark.real_model
def test_gemma_info_tokenizer_and_chat_fallback(gemma: LlamaBackend) -> None:
    info = gemma.info
    assert (info.n_vocab, info.n_swa, info.quant, info.architecture) == (
        262144,
        512,
        "q4_k_m",
        "gemma3",
    )
    assert info.eog == (1, 106, 212)
    assert info.chat_template is None
    assert info.chat_template_fallback == "gemma"
    assert not info.add_space_prefix
    text = "Hello, wörld! 你好 🙂"
    assert gemma.detokenize(gemma.tokenize(text)) == text.encode()
    chat = gemma.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    toks = gemma.tokenize(chat, parse_special=True)
    assert 106 in toks  # <end_of_turn> as one control token


@pytest.mark.real_model
def test_gemma_pack_unpack_600_tokens_continues_exactly(gemma: LlamaBackend) -> None:
    toks = gemma_prompt(gemma, 600)
    g = gemma.new_sampler(SamplingParams())
    prefill(gemma, 0, toks)
    with gemma.pack(0) as buf:
        assert gemma.unpack(1, buf) == 600
    assert gemma.seq_pos_min(1) > 0  # only the sliding window's cells came back
    assert gen(gemma, 1, g, 8) == gen(gemma, 0, g, 8)


@pytest.mark.real_model
@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(SamplingParams(), id="greedy"),
        pytest.param(
            SamplingParams(temperature=0.8, seed=1234, top_k=40, repeat_penalty=1.1),
            id="temp0.8-seed-penalty",
        ),
    ],
)
def test_gemma_stop_and_resume_is_exact(gemma: LlamaBackend, cfg: SamplingParams) -> None:
    assert_stop_and_resume_exact(gemma, gemma_prompt(gemma, 80), cfg)


@pytest.mark.real_model
def test_gemma_logits_do_not_depend_on_other_sequences(
    gemma: LlamaBackend, gemma_path: Path
) -> None:
    toks, other = gemma_prompt(gemma, 80), gemma_prompt(gemma, 300)
    assert placement_diffs(gemma, toks, other) == (0.0, 0.0)
    with LlamaBackend.load(
        gemma_path, n_ctx=1024, n_batch=512, n_threads=2, kv_unified=True
    ) as uni:
        diffs = placement_diffs(uni, toks, other)
        print(f"\ngemma, unified KV cache: max logit differences {diffs}")


@pytest.mark.real_model
def test_gemma_truncate_respects_the_sliding_window(gemma: LlamaBackend) -> None:
    toks = gemma_prompt(gemma, 600)
    prefill(gemma, 0, toks)
    with gemma.pack(0) as buf:
        gemma.unpack(1, buf)
    pos_min = gemma.seq_pos_min(1)
    print(f"\nafter restoring 600 tokens: pos_min {pos_min}, n_swa {gemma.info.n_swa}")
    assert pos_min == 600 - 512
    assert gemma.truncate(1, 600)  # no-op
    assert not gemma.truncate(1, 599)  # the window for position 599 starts before pos_min
    assert not gemma.truncate(1, 300)
    assert gemma.seq_len(1) == 600
    assert gemma.has_logits(1)  # refused cuts change nothing
    # the sequence that was prefilled here still holds every cell: cutting works
    assert gemma.seq_pos_min(0) == 0
    assert gemma.truncate(0, 300)
    assert gemma.seq_len(0) == 300
    gemma.step([Prefill(0, toks[300:301])])
    g = gemma.new_sampler(SamplingParams())
    gen(gemma, 0, g, 2)
    assert gemma.seq_len(0) == 303


@pytest.mark.real_model
def test_gemma_restore_sampling_and_the_2000_token_measurement(gemma: LlamaBackend) -> None:
    """Measured and printed, not asserted: cold prefill vs warm restore at 2,000 tokens."""
    toks = gemma_prompt(gemma, 2000)
    t0 = time.perf_counter()
    prefill(gemma, 0, toks)
    cold_prefill = time.perf_counter() - t0
    g = gemma.new_sampler(SamplingParams())
    t0 = time.perf_counter()
    buf = gemma.pack(0)
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gemma.unpack(1, buf)
    unpack_s = time.perf_counter() - t0
    buf.close()
    logits = stored_logits(gemma, 1)
    t0 = time.perf_counter()
    first_warm = gemma.sample_logits(g, logits, 2000)
    sample_s = time.perf_counter() - t0
    s2 = gemma.new_sampler(SamplingParams(temperature=0.8, top_k=40, seed=1, repeat_penalty=1.1))
    times = []
    for p in range(20):
        t0 = time.perf_counter()
        gemma.sample_logits(s2, logits, p)
        times.append(time.perf_counter() - t0)
    (cold,) = gemma.step([Decode(0, g)])
    assert isinstance(cold, Sampled)
    assert first_warm == cold.token
    warm = unpack_s + sample_s
    print(
        f"\ngemma-3-270m, 2 threads, 2,000 tokens: cold prefill {cold_prefill:.2f} s; "
        f"pack {pack_s * 1e3:.1f} ms ({buf.size / 1e6:.1f} MB); unpack {unpack_s * 1e3:.1f} ms; "
        f"first token from stored logits {sample_s * 1e3:.2f} ms (greedy); "
        f"warm total {warm * 1e3:.1f} ms; cold/warm {cold_prefill / warm:.0f}x; "
        f"restore-buffer sampling at vocab 262144 (top-k 40, temp, penalty): "
        f"median {sorted(times)[10] * 1e3:.2f} ms"
    )
