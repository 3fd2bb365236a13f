"""The public API of a running runtime: every call, its validation, and its results.

Each call either answers or raises a clear `ErllamaError` at once (never a hang, never a
dead model: the model serves the next request). Results, infos, counters and rows are
frozen, typed objects whose ``to_dict()`` is plain JSON; the tree is JSON already. Runs on
the stub and on the tiny llama model.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

import erllama_py
from erllama_py import (
    CacheHit,
    Completion,
    ConfigError,
    ContextOverflowError,
    FinishReason,
    HitKind,
    InvalidRequestError,
    ModelAlreadyLoadedError,
    ModelLoadError,
    ModelNotFoundError,
    RuntimeStoppedError,
)
from erllama_py.model.testmodel import write_test_model

RESULT_KEYS = {
    "id",
    "model",
    "text",
    "tokens",
    "finish_reason",
    "finish_key",
    "stop_sequence",
    "usage",
    "cache",
    "timings",
    "logprobs",
}
TIMING_KEYS = {"queue_ms", "restore_ms", "prefill_ms", "decode_ms", "ttft_ms", "total_ms"}
# The tiny model's byte tokens spell these characters over 2, 3 and 4 tokens.
MULTIBYTE = "é漢字😀 the cat"
NO_HANG_S = 30.0


def within(fn: Callable[[], Any], timeout: float = NO_HANG_S) -> Any:
    """Run `fn` in a thread; fail if it neither returns nor raises within `timeout` s."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"the call hung for more than {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def forced(text: str) -> str:
    """A GBNF grammar whose only sentence is `text` (no quotes or backslashes in it)."""
    assert '"' not in text and "\\" not in text
    return f'root ::= "{text}"'


def assert_result_shape(result: Completion, prompt_len: int) -> None:
    assert isinstance(result, Completion)
    assert isinstance(result.text, str)
    assert isinstance(result.tokens, list) and all(isinstance(t, int) for t in result.tokens)
    assert isinstance(result.finish_reason, FinishReason)
    assert result.finish_reason in ("stop", "length", "cancelled")
    key = result.finish_key
    assert key is None or (isinstance(key, str) and len(bytes.fromhex(key)) == 16)
    usage = result.usage
    assert usage.prompt_tokens == prompt_len
    assert usage.completion_tokens == len(result.tokens)
    assert usage.total_tokens == prompt_len + len(result.tokens)
    assert usage.cached_tokens == result.cache.prefix_len
    assert isinstance(result.cache.kind, HitKind)
    assert 0 <= result.cache.prefix_len <= prompt_len
    timings = result.timings
    for name, value in timings.to_dict().items():
        if name == "ttft_ms" and not result.tokens:
            continue
        assert isinstance(value, float) and value >= 0.0, (name, value)
    # queue, then prefill (or restore), then decode: the phases add up to the total.
    phases = timings.queue_ms + timings.prefill_ms + timings.decode_ms
    assert phases == pytest.approx(timings.total_ms, abs=0.05)
    # The JSON form: today's shape, and plain JSON (enums become their strings).
    data = result.to_dict()
    assert set(data) == RESULT_KEYS
    assert set(data["timings"]) == TIMING_KEYS
    assert json.loads(json.dumps(data)) == data
    assert type(data["finish_reason"]) is str and type(data["cache"]["kind"]) is str


# --------------------------------------------------------------------------- results


def test_a_completion_result_is_a_json_dict_of_the_documented_shape(served):
    prompt = served.tokens("the red cat and the blue dog")
    result = served.complete("the red cat and the blue dog", max_tokens=6)
    assert_result_shape(result, len(prompt))
    assert result.model == served.name
    assert result.finish_reason == "length"
    assert len(result.tokens) == 6
    assert result.text == served.rt.detokenize(served.name, result.tokens)
    assert result.finish_key is not None
    assert result.timings.prefill_ms > 0.0


def test_an_exact_hit_reports_its_time_as_restore_and_decode_not_prefill(served, wait_until):
    text = "the moon and the sun was warm"
    served.complete(text, max_tokens=5)
    served.rt.cache.wait_idle()
    hit = served.complete(text, max_tokens=5)
    assert hit.cache.kind == "exact"
    assert_result_shape(hit, len(served.tokens(text)))
    assert hit.timings.decode_ms > 0.0
    # Nothing is left to prefill, and the restore lies within the prefill phase (each
    # figure is rounded to 0.001 ms). How long it takes is bench/'s business.
    assert hit.usage.cached_tokens == hit.usage.prompt_tokens
    assert hit.timings.restore_ms <= hit.timings.prefill_ms + 0.001


def test_generation_ending_on_an_end_of_generation_token_finishes_with_stop(rt, load):
    stub = load(rt, "stub", "eog", stub={"eog_after": 3})
    result = stub.complete("hello world", max_tokens=10)
    assert result.finish_reason == "stop"
    assert len(result.tokens) == 3
    assert result.stop_sequence is None


def test_generation_ending_by_grammar_finishes_with_stop_on_the_tiny_model(served_models):
    tiny = served_models["tiny"]
    result = tiny.complete("hello", max_tokens=40, grammar=forced("yes"))
    assert result.text == "yes"
    assert result.finish_reason == "stop"


def test_generation_without_max_tokens_stops_when_the_context_is_full(served):
    prompt = [1] + [5 + i % 300 for i in range(served.n_ctx - 11)]
    result = served.complete(prompt, max_tokens=None)
    assert_result_shape(result, len(prompt))
    assert result.usage.total_tokens <= served.n_ctx
    if served.kind == "stub" or result.finish_reason == "length":
        assert result.finish_reason == "length"
        assert result.usage.total_tokens == served.n_ctx
    assert served.complete("the cat", max_tokens=2).tokens


def test_max_tokens_zero_generates_nothing_and_still_saves_the_prompt(served):
    prompt = served.tokens("a slow blue tree")
    result = served.complete(prompt, max_tokens=0)
    assert_result_shape(result, len(prompt))
    assert result.tokens == [] and result.text == ""
    assert result.finish_reason == "length"
    served.rt.cache.wait_idle()
    assert served.complete(prompt, max_tokens=1).cache.kind == "exact"


def test_a_token_list_prompt_is_used_as_given_without_a_bos(served):
    text = "one two three green sky"
    with_bos = served.tokens(text)
    assert with_bos[0] == served.info.bos
    from_text = served.complete(text, max_tokens=4)
    from_tokens = served.complete(with_bos, max_tokens=4)
    assert from_tokens.usage.prompt_tokens == len(with_bos)
    assert from_tokens.tokens == from_text.tokens
    served.rt.cache.wait_idle()
    # Same tokens, same key: had a second BOS been added, this would not be a hit.
    assert served.complete(with_bos, max_tokens=1).cache.kind == "exact"
    without_bos = with_bos[1:]
    result = served.complete(without_bos, max_tokens=2)
    assert result.usage.prompt_tokens == len(without_bos)
    assert result.cache.kind != "exact"


# --------------------------------------------------------------------------- validation


def _vocab_edge(m) -> list[int]:
    return [1, m.n_vocab]


CASES: list[tuple[str, Callable[[Any], Any], type[Exception], str | None]] = [
    ("empty text", lambda m: m.complete(""), InvalidRequestError, "prompt"),
    ("empty token list", lambda m: m.complete([]), InvalidRequestError, "prompt"),
    ("prompt of a wrong type", lambda m: m.complete(42), InvalidRequestError, "prompt"),
    ("None prompt", lambda m: m.complete(None), InvalidRequestError, "prompt"),
    ("a string token", lambda m: m.complete([1, "5"]), InvalidRequestError, "prompt"),
    ("a bool token", lambda m: m.complete([1, True]), InvalidRequestError, "prompt"),
    ("token id = n_vocab", lambda m: m.complete(_vocab_edge(m)), InvalidRequestError, "prompt"),
    ("negative token id", lambda m: m.complete([1, -1]), InvalidRequestError, "prompt"),
    (
        "token prompt filling the context",
        lambda m: m.complete([5] * m.n_ctx),
        ContextOverflowError,
        "prompt",
    ),
    (
        "text prompt longer than the context",
        lambda m: m.complete("cat " * (m.n_ctx + 8)),
        ContextOverflowError,
        "prompt",
    ),
    ("negative max_tokens", lambda m: m.complete("hi", max_tokens=-1), InvalidRequestError, None),
    (
        "max_tokens not an int",
        lambda m: m.complete("hi", max_tokens=2.5),
        InvalidRequestError,
        None,
    ),
    ("unknown option", lambda m: m.complete("hi", temprature=0.5), InvalidRequestError, None),
    ("negative temperature", lambda m: m.complete("hi", temperature=-1), InvalidRequestError, None),
    ("top_p of zero", lambda m: m.complete("hi", top_p=0.0), InvalidRequestError, None),
    ("stop of a wrong type", lambda m: m.complete("hi", stop=5), InvalidRequestError, None),
    (
        "parent_key not hex",
        lambda m: m.complete("hi", parent_key="zz" * 16),
        InvalidRequestError,
        "parent_key",
    ),
    (
        "parent_key too short",
        lambda m: m.complete("hi", parent_key=b"short"),
        InvalidRequestError,
        "parent_key",
    ),
    (
        "parent_key of a wrong type",
        lambda m: m.complete("hi", parent_key=12),
        InvalidRequestError,
        "parent_key",
    ),
    (
        "invalid grammar",
        lambda m: m.complete("hi", grammar="greeting ::= undefined-rule"),
        InvalidRequestError,
        "grammar",
    ),
    (
        "json_schema that is not JSON",
        lambda m: m.complete("hi", json_schema="{"),
        InvalidRequestError,
        "json_schema",
    ),
    (
        "json_schema that is a JSON list",
        lambda m: m.complete("hi", json_schema=[{"type": "string"}]),
        InvalidRequestError,
        "json_schema",
    ),
    (
        "json_schema text that is a JSON list",
        lambda m: m.complete("hi", json_schema="[1, 2]"),
        InvalidRequestError,
        "json_schema",
    ),
    (
        "grammar and json_schema",
        lambda m: m.complete("hi", grammar=forced("a"), json_schema={"type": "string"}),
        InvalidRequestError,
        "json_schema",
    ),
    ("no messages", lambda m: m.rt.chat(m.name, []), InvalidRequestError, "messages"),
    ("messages as text", lambda m: m.rt.chat(m.name, "hi"), InvalidRequestError, "messages"),
    (
        "message without content",
        lambda m: m.rt.chat(m.name, [{"role": "user"}]),
        InvalidRequestError,
        "messages",
    ),
    (
        "message without role",
        lambda m: m.rt.chat(m.name, [{"content": "hi"}]),
        InvalidRequestError,
        "messages",
    ),
    (
        "message that is not an object",
        lambda m: m.rt.chat(m.name, ["hi"]),
        InvalidRequestError,
        "messages",
    ),
    (
        "content blocks",
        lambda m: m.rt.chat(m.name, [{"role": "user", "content": [{"text": "hi"}]}]),
        InvalidRequestError,
        "messages",
    ),
    (
        "chat with an unknown option",
        lambda m: m.rt.chat(m.name, [{"role": "user", "content": "hi"}], bogus=1),
        InvalidRequestError,
        None,
    ),
    ("stream with an empty prompt", lambda m: m.rt.stream(m.name, ""), InvalidRequestError, None),
    (
        "stream with a negative max_tokens",
        lambda m: m.rt.stream(m.name, "hi", max_tokens=-3),
        InvalidRequestError,
        None,
    ),
    ("prefill of nothing", lambda m: m.rt.prefill(m.name, []), InvalidRequestError, "prompt"),
    (
        "prefill with a bad parent_key",
        lambda m: m.rt.prefill(m.name, "hi", parent_key="nope"),
        InvalidRequestError,
        "parent_key",
    ),
    ("tokenize of bytes", lambda m: m.rt.tokenize(m.name, b"hi"), InvalidRequestError, "text"),
    (
        "detokenize outside the vocabulary",
        lambda m: m.rt.detokenize(m.name, [m.n_vocab + 5]),
        InvalidRequestError,
        None,
    ),
    ("embed of nothing", lambda m: m.rt.embed(m.name, []), InvalidRequestError, "inputs"),
    ("embed of an empty text", lambda m: m.rt.embed(m.name, [""]), InvalidRequestError, "inputs"),
]


@pytest.mark.parametrize(("case", "call", "error", "param"), CASES, ids=[c[0] for c in CASES])
def test_an_invalid_call_raises_a_clear_error_and_the_model_keeps_serving(
    served, case, call, error, param
):
    with pytest.raises(error) as info:
        within(lambda: call(served))
    assert str(info.value), f"{case}: the error has no message"
    if param is not None:
        assert info.value.param == param
    else:
        assert info.value.param  # every request error names its parameter
    after = within(lambda: served.complete("the cat", max_tokens=2))
    assert len(after.tokens) == 2


def test_an_invalid_grammar_is_refused_by_llama_cpp_with_its_parser_message(served_models):
    tiny = served_models["tiny"]
    with pytest.raises(InvalidRequestError, match="grammar") as info:
        within(lambda: tiny.complete("hi", grammar="root ::= ( unclosed"))
    assert info.value.param == "grammar"
    assert tiny.complete("hi", max_tokens=1).finish_reason == "length"


def test_an_unknown_chat_template_is_refused_on_the_tiny_model(served_models):
    tiny = served_models["tiny"]
    with pytest.raises(InvalidRequestError) as info:
        within(lambda: tiny.rt.chat("tiny", [{"role": "user", "content": "hi"}], template="zz9"))
    assert info.value.param == "template"


CALLS_BY_NAME: list[tuple[str, Callable[[Any, str], Any]]] = [
    ("complete", lambda rt, n: rt.complete(n, "hi")),
    ("stream", lambda rt, n: rt.stream(n, "hi")),
    ("chat", lambda rt, n: rt.chat(n, [{"role": "user", "content": "hi"}])),
    ("chat_stream", lambda rt, n: rt.chat_stream(n, [{"role": "user", "content": "hi"}])),
    ("prefill", lambda rt, n: rt.prefill(n, "hi")),
    ("tokenize", lambda rt, n: rt.tokenize(n, "hi")),
    ("detokenize", lambda rt, n: rt.detokenize(n, [1, 2])),
    ("embed", lambda rt, n: rt.embed(n, "hi")),
    ("unload", lambda rt, n: rt.unload(n)),
    ("evict", lambda rt, n: rt.evict(n)),
    ("model_info", lambda rt, n: rt.model_info(n)),
    ("phase", lambda rt, n: rt.phase(n)),
    ("pending_len", lambda rt, n: rt.pending_len(n)),
    ("last_cache_hit", lambda rt, n: rt.last_cache_hit(n)),
    ("acomplete", lambda rt, n: asyncio.run(rt.acomplete(n, "hi"))),
    ("achat", lambda rt, n: asyncio.run(rt.achat(n, [{"role": "user", "content": "hi"}]))),
    ("astream", lambda rt, n: asyncio.run(_first_event(rt.astream(n, "hi")))),
]


async def _first_event(events: Any) -> Any:
    async for event in events:
        return event
    return None


@pytest.mark.parametrize(("call_name", "call"), CALLS_BY_NAME, ids=[c[0] for c in CALLS_BY_NAME])
def test_every_call_on_an_unknown_model_raises_model_not_found(served_models, call_name, call):
    rt = served_models["stub"].rt
    with pytest.raises(ModelNotFoundError) as info:
        within(lambda: call(rt, "no-such-model"))
    assert info.value.model == "no-such-model"
    assert "no-such-model" in str(info.value)


def test_load_model_refuses_bad_options_a_taken_name_and_a_missing_file(rt, load, tmp_path):
    load(rt, "stub", "taken")
    with pytest.raises(ConfigError) as info:
        rt.load_model("x", backend="stub", n_ctxx=128)
    assert "n_ctxx" in info.value.key
    with pytest.raises(ConfigError) as info:
        rt.load_model("x", backend="stub", tier="nowhere")
    assert info.value.key.endswith("tier")
    with pytest.raises(ModelAlreadyLoadedError):
        rt.load_model("taken", backend="stub")
    with pytest.raises(ModelLoadError):
        rt.load_model("x", model_path=tmp_path / "missing.gguf")
    assert [m.name for m in rt.models()] == ["taken"]
    assert rt.complete("taken", "still here", max_tokens=1).tokens


def test_astream_and_acomplete_raise_validation_errors_to_the_awaiting_coroutine(served):
    async def main() -> None:
        with pytest.raises(InvalidRequestError):
            await served.rt.acomplete(served.name, "", max_tokens=1)
        with pytest.raises(InvalidRequestError):
            async for _event in served.rt.astream(served.name, "hi", max_tokens=-1):
                pass
        result = await served.rt.acomplete(served.name, "the cat", max_tokens=2)
        assert len(result.tokens) == 2

    asyncio.run(main())


# --------------------------------------------------------------------------- stop sequences


def test_stop_sequences_are_trimmed_from_the_text_and_the_stream_on_the_stub(served_models):
    stub = served_models["stub"]
    full = stub.complete("red tree sky", max_tokens=8).text
    pieces = full.split(" ")[1:]
    stop = f" {pieces[3]} {pieces[4][:2]}"
    expected = full[: full.find(stop)]
    result = stub.complete("red tree sky", max_tokens=8, stop=["never-seen", stop])
    assert result.text == expected
    assert stop not in result.text
    assert result.finish_reason == "stop"
    assert result.stop_sequence == stop
    assert result.finish_key is not None
    events = list(stub.rt.stream(stub.name, "red tree sky", max_tokens=8, stop=[stop]))
    deltas = [e.text for e in events if e.type == "delta"]
    assert "".join(deltas) == expected
    assert events[-1].completion.text == expected


@pytest.mark.parametrize(
    ("stops", "expected", "matched"),
    [
        (["字"], "é漢", "字"),  # a character of three byte tokens
        ([" the"], "é漢字😀", " the"),  # a sequence over several tokens
        (["cat", "😀 t"], "é漢字", "😀 t"),  # the leftmost match wins
        (["cats"], MULTIBYTE, None),  # a partial match at the end is released
        (["é"], "", "é"),  # a match at the very start
    ],
)
def test_stop_sequences_never_reach_the_text_or_a_stream_delta_on_the_tiny_model(
    served_models, stops, expected, matched
):
    tiny = served_models["tiny"]
    options = {"max_tokens": 40, "grammar": forced(MULTIBYTE), "stop": stops}
    result = tiny.complete("hello", **options)
    assert result.text == expected
    assert result.stop_sequence == matched
    assert result.finish_reason == "stop"
    events = list(tiny.rt.stream(tiny.name, "hello", **options))
    deltas = [e.text for e in events if e.type == "delta"]
    assert "".join(deltas) == expected
    if matched is not None:
        assert not any(matched in d for d in deltas)
    assert events[-1].completion.text == expected


# --------------------------------------------------------------------------- streams


def test_stream_deltas_never_split_a_utf8_character(served_models):
    tiny = served_models["tiny"]
    events = list(tiny.rt.stream(tiny.name, "hello", max_tokens=40, grammar=forced(MULTIBYTE)))
    deltas = [e for e in events if e.type == "delta"]
    assert "".join(d.text for d in deltas) == MULTIBYTE
    for delta in deltas:
        assert "\ufffd" not in delta.text
        delta.text.encode("utf-8")  # whole characters only (no lone surrogates either)
    # The characters really were split over byte tokens: some tokens came with no text.
    assert any(d.tokens and d.text == "" for d in deltas)
    assert len(deltas) > len(MULTIBYTE)


def test_a_stream_ends_with_exactly_one_done_event_holding_the_result(served):
    events = list(served.rt.stream(served.name, "the dog and the cat", max_tokens=7))
    kinds = [e.type for e in events]
    assert kinds.count("done") == 1 and kinds[-1] == "done"
    assert set(kinds[:-1]) <= {"delta"}
    result = events[-1].completion
    assert_result_shape(result, len(served.tokens("the dog and the cat")))
    deltas = events[:-1]
    assert "".join(e.text for e in deltas) == result.text
    assert [t for e in deltas for t in e.tokens] == result.tokens
    assert json.loads(json.dumps([e.to_dict() for e in events])) == [e.to_dict() for e in events]
    assert result.tokens == served.complete("the dog and the cat", max_tokens=7).tokens


def test_a_stream_used_as_a_context_manager_cancels_when_the_block_is_left(rt, load, wait_until):
    stub = load(rt, "stub", "slow", stub={"step_delay": 0.01})
    with rt.stream("slow", "the cat", max_tokens=5000) as events:
        first = next(events)
        assert first.type == "delta"
    wait_until(lambda: rt.model_info("slow").active == 0, "the stream's request ended")
    assert list(events) == []
    assert stub.complete("next one", max_tokens=2).finish_reason == "length"


# --------------------------------------------------------------------------- asyncio


def _tick_while(awaitable_factory: Callable[[], Any]) -> tuple[Any, int]:
    """Run a coroutine next to a ticker; return its value and the ticks seen meanwhile."""

    async def main() -> tuple[Any, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.002)

        task = asyncio.create_task(ticker())
        try:
            value = await awaitable_factory()
        finally:
            done.set()
            await task
        return value, ticks

    return asyncio.run(main())


def test_acomplete_does_not_block_the_event_loop(rt, load):
    stub = load(rt, "stub", "slow", stub={"step_delay": 0.01})
    result, ticks = _tick_while(lambda: rt.acomplete("slow", "async cat", max_tokens=20))
    assert len(result.tokens) == 20
    assert result.tokens == stub.complete("async cat", max_tokens=20).tokens
    # A loop blocked by the call would not tick at all (the ticker runs only when the call
    # yields); 3 ticks of 2 ms within 20 steps of 10 ms ask for no particular speed.
    assert ticks >= 3


def test_achat_does_not_block_the_event_loop(rt, load):
    load(rt, "stub", "slow", stub={"step_delay": 0.01})
    messages = [{"role": "user", "content": "hello there"}]
    result, ticks = _tick_while(lambda: rt.achat("slow", messages, max_tokens=20))
    assert len(result.tokens) == 20
    assert result.tokens == rt.chat("slow", messages, max_tokens=20).tokens
    assert ticks >= 3


def test_astream_does_not_block_the_event_loop_and_yields_the_stream_events(rt, load):
    stub = load(rt, "stub", "slow", stub={"step_delay": 0.01})

    async def collect() -> list[dict[str, Any]]:
        return [e async for e in rt.astream("slow", "astream cat", max_tokens=20)]

    events, ticks = _tick_while(collect)
    assert [e.type for e in events] == ["delta"] * 20 + ["done"]
    assert events[-1].completion.tokens == stub.complete("astream cat", max_tokens=20).tokens
    assert ticks >= 3


def test_cancelling_an_acomplete_task_cancels_the_request(rt, load, wait_until):
    stub = load(rt, "stub", "slow", stub={"step_delay": 0.01})

    async def main() -> None:
        task = asyncio.create_task(rt.acomplete("slow", "cancel me", max_tokens=5000))
        while rt.phase("slow") != "generating":
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # 5000 tokens would take 50 s: the request must have been stopped.
    wait_until(lambda: rt.model_info("slow").active == 0, "the cancelled request ended", 5.0)
    assert rt.model_info("slow").requests_done == 1
    assert stub.complete("after", max_tokens=2).finish_reason == "length"


def test_breaking_out_of_astream_cancels_the_request(rt, load, wait_until):
    load(rt, "stub", "slow", stub={"step_delay": 0.01})

    async def main() -> int:
        seen = 0
        events = rt.astream("slow", "break me", max_tokens=5000)
        async for _event in events:
            seen += 1
            if seen == 3:
                break
        await events.aclose()
        return seen

    assert asyncio.run(main()) == 3
    wait_until(lambda: rt.model_info("slow").active == 0, "the abandoned stream ended", 5.0)
    assert rt.complete("slow", "after", max_tokens=1).tokens


# --------------------------------------------------------------------------- chat


def test_chat_renders_the_template_of_the_gguf(served_models):
    tiny = served_models["tiny"]
    rt = tiny.rt
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
    ]
    default = rt.chat("tiny", messages, max_tokens=4)
    chatml = rt.chat("tiny", messages, max_tokens=4, template="chatml")
    other = rt.chat("tiny", messages, max_tokens=4, template="llama2")
    assert default.usage.prompt_tokens == chatml.usage.prompt_tokens
    assert default.tokens == chatml.tokens
    assert other.usage.prompt_tokens != default.usage.prompt_tokens
    # The template's markers became the special tokens, not their spelling in bytes.
    rendered = (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert default.usage.prompt_tokens < len(tiny.tokens(rendered)) - 20
    stream = list(rt.chat_stream("tiny", messages, max_tokens=4))
    assert stream[-1].completion.tokens == default.tokens


def test_chat_falls_back_to_the_named_template_when_the_gguf_has_none(rt, tmp_path):
    path = write_test_model(tmp_path / "no-template.gguf", chat_template=None)
    info = rt.load_model("plain", model_path=path, n_ctx=256, n_batch=64, n_threads=1).info()
    assert info.chat_template is False
    fallback = info.chat_template_fallback
    assert fallback
    messages = [{"role": "user", "content": "hello"}]
    default = rt.chat("plain", messages, max_tokens=3)
    named = rt.chat("plain", messages, max_tokens=3, template=fallback)
    chatml = rt.chat("plain", messages, max_tokens=3, template="chatml")
    assert default.usage.prompt_tokens == named.usage.prompt_tokens
    assert default.tokens == named.tokens
    assert chatml.usage.prompt_tokens != default.usage.prompt_tokens


def test_chat_on_the_stub_is_the_completion_of_its_rendered_conversation(served_models):
    stub = served_models["stub"]
    messages = [{"role": "user", "content": "hello there"}, {"role": "bot", "content": "hi"}]
    chat = stub.rt.chat("stub", messages, max_tokens=5)
    plain = stub.complete("user: hello there\nbot: hi\n", max_tokens=5)
    assert chat.tokens == plain.tokens
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens


# --------------------------------------------------------------------------- other calls


def test_prefill_warms_the_cache_without_sampling(served):
    prompt = served.tokens("the fast tree and the slow sun")
    result = served.rt.prefill(served.name, prompt)
    assert result.tokens == [] and result.text == ""
    assert result.usage.completion_tokens == 0
    assert result.finish_key is not None
    served.rt.cache.wait_idle()
    keys = {row.key_hex: row for row in served.rt.cache_rows()}
    assert keys[result.finish_key].n_tokens == len(prompt)
    hit = served.complete(prompt, max_tokens=3)
    assert hit.cache == CacheHit("exact", len(prompt))
    assert hit.usage.cached_tokens == len(prompt)


def test_tokenize_and_detokenize_round_trip(model):
    text = "hello world the cat"
    tokens = model.rt.tokenize(model.name, text)
    assert tokens[0] == model.info.bos
    assert model.rt.tokenize(model.name, text, add_special=False) == tokens[1:]
    assert all(0 <= t < model.n_vocab for t in tokens)
    assert model.rt.detokenize(model.name, tokens).strip() == text
    assert model.rt.detokenize(model.name, []) == ""


def test_embed_returns_one_deterministic_vector_per_input(served):
    vectors = served.rt.embed(served.name, ["hello world", "the cat", "hello world"])
    assert len(vectors) == 3
    assert all(isinstance(x, float) for v in vectors for x in v)
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 0
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    assert served.rt.embed(served.name, "hello world") == [vectors[0]]


def test_model_info_models_counters_rows_and_tree_are_json(served):
    rt = served.rt
    served.complete("the cat and the sun", max_tokens=3)
    rt.cache.wait_idle()
    for value in (
        rt.model_info(served.name).to_dict(),
        [m.to_dict() for m in rt.models()],
        rt.counters().to_dict(),
        [row.to_dict() for row in rt.cache_rows()],
    ):
        assert json.loads(json.dumps(value)) == value
    tree = rt.tree()
    assert json.loads(json.dumps(tree)) == tree
    info = rt.model_info(served.name)
    assert info.name == served.name
    assert info.status == "loaded" and info.phase == "idle"
    assert info.backend == ("stub" if served.kind == "stub" else "llama")
    assert info.worker.state == "running"
    assert isinstance(info.worker.pid, int)
    assert info.n_vocab == served.n_vocab
    assert rt.phase(served.name) == "idle"
    assert rt.pending_len(served.name) == 0
    assert rt.last_cache_hit(served.name) == info.last_cache_hit
    assert info.last_cache_hit.kind in ("exact", "parent", "prefix", "cold")
    assert {m.name for m in rt.models()} == {"stub", "tiny"}
    counters = rt.counters()
    assert counters.misses >= 1
    assert {t.kind for t in counters.tiers} == {"ram", "ram_file", "disk"}
    rows = rt.cache_rows()
    assert rows and {"key", "tier", "tokens", "bytes", "refcount", "reason"} <= set(
        rows[0].to_dict()
    )


def test_the_tree_shows_each_models_worker_pid_and_restarts(served_models):
    rt = served_models["stub"].rt
    tree = rt.tree()
    assert tree["name"] == "erllama_sup" and tree["state"] == "running"

    def find(node: dict[str, Any], name: str) -> dict[str, Any] | None:
        if node["name"] == name:
            return node
        for child in node.get("children") or []:
            found = find(child, name)
            if found is not None:
                return found
        return None

    for name in ("stub", "tiny"):
        worker = find(tree, f"model:{name}/worker")
        assert worker is not None
        assert worker["pid"] == rt.model_info(name).worker.pid
        assert worker["restarts"] == rt.model_info(name).worker.restarts == 0
        assert find(tree, f"model:{name}/actor") is not None
    assert find(tree, "cache_meta") is not None


def test_unload_forgets_the_model_and_a_new_load_serves_again(rt, load):
    stub = load(rt, "stub")
    pid = stub.worker_pid()
    first = stub.complete("the cat", max_tokens=3)
    rt.unload("m")
    assert rt.models() == []
    with pytest.raises(ModelNotFoundError):
        rt.complete("m", "the cat")
    assert not _alive(pid)
    again = load(rt, "stub")
    assert again.worker_pid() != pid
    assert again.complete("the cat", max_tokens=3).tokens == first.tokens


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_runtime_is_a_context_manager_and_refuses_calls_once_stopped(make_runtime, load):
    rt = make_runtime()
    with rt:
        stub = load(rt, "stub")
        pid = stub.worker_pid()
        assert stub.complete("the cat", max_tokens=1).tokens
    assert not _alive(pid)
    for call in (
        lambda: rt.complete("m", "the cat"),
        lambda: rt.stream("m", "the cat"),
        lambda: rt.tokenize("m", "the cat"),
        lambda: rt.detokenize("m", [1]),
        lambda: rt.prefill("m", "the cat"),
        lambda: rt.unload("m"),
        lambda: rt.load_model("n", backend="stub"),
        rt.tree,
        lambda: asyncio.run(rt.acomplete("m", "the cat")),
    ):
        with pytest.raises(RuntimeStoppedError):
            within(call)
    rt.stop()  # idempotent


def test_start_accepts_none_for_all_defaults_and_stops_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    # The default ram_file root is machine-wide (/dev/shm/erllama-py): not this test's.
    monkeypatch.setattr(erllama_py.config, "DEFAULT_RAM_FILE_ROOT", tmp_path / "shm")
    rt = erllama_py.start()
    try:
        assert rt.models() == []
        assert rt.tree()["state"] == "running"
        assert rt.counters().misses == 0
    finally:
        rt.stop()
