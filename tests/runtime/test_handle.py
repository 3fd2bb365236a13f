"""The typed public surface: model handles, asyncio twins, typed options and results.

A handle answers exactly as the name-first runtime calls do (those forward to it);
every blocking call has an ``a``-prefixed twin; options are validated in one place,
whether given one by one or as a `SamplingParams`; a request's own ``timeout`` ends
it with `RequestTimeoutError` and leaves the model serving.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import types

import numpy as np
import pytest

import erllama_py
from erllama_py import (
    CacheHit,
    Completion,
    Delta,
    Done,
    FinishReason,
    HitKind,
    InvalidRequestError,
    ModelHandle,
    ModelNotFoundError,
    Phase,
    RequestTimeoutError,
    SamplingParams,
)

# Calls that return at once (lock-free reads, or submissions that hand back a stream).
NOT_BLOCKING = {
    "name",
    "phase",
    "pending_len",
    "last_hit",
    "chat_template_text",
    "stream",
    "chat_stream",
}


def test_every_blocking_handle_call_has_an_asyncio_twin() -> None:
    public = {n for n in dir(ModelHandle) if not n.startswith("_")}
    blocking = {n for n in public if not n.startswith("a") and n not in NOT_BLOCKING}
    assert blocking >= {"complete", "chat", "prefill", "tokenize", "detokenize", "embed", "info"}
    for name in blocking:
        twin = getattr(ModelHandle, f"a{name}", None)
        assert twin is not None, f"ModelHandle.{name} has no asyncio twin"
        assert inspect.iscoroutinefunction(twin), f"ModelHandle.a{name} is not a coroutine"
    for name in ("stream", "chat_stream"):
        assert hasattr(ModelHandle, f"a{name}")


def test_the_package_exports_exactly_its_public_names() -> None:
    exported = set(erllama_py.__all__)
    public = {
        name
        for name, value in vars(erllama_py).items()
        if not name.startswith("_")
        and name != "annotations"
        and not isinstance(value, types.ModuleType)
    }
    assert exported == public
    assert len(erllama_py.__all__) == len(exported), "a name is listed twice"


def test_a_handle_gives_the_same_typed_results_as_the_name_first_calls(served):
    m = served.rt.model(served.name)
    assert isinstance(m, ModelHandle) and m.name == served.name
    prompt = "the red cat and the blue dog"
    by_handle = m.complete(prompt, max_tokens=5)
    by_name = served.rt.complete(served.name, prompt, max_tokens=5)
    assert isinstance(by_handle, Completion) and isinstance(by_name, Completion)
    assert by_handle.tokens == by_name.tokens and by_handle.text == by_name.text
    assert by_name.cache == CacheHit(HitKind.EXACT, len(m.tokenize(prompt)))
    assert m.tokenize(prompt) == served.rt.tokenize(served.name, prompt)
    assert m.detokenize(by_name.tokens) == served.rt.detokenize(served.name, by_name.tokens)
    assert m.info().to_dict()["name"] == served.rt.model_info(served.name).name
    assert m.phase() is Phase.IDLE and m.pending_len() == 0
    assert m.last_hit() == by_name.cache


def test_stream_events_are_typed_deltas_then_one_done_with_the_completion(served):
    m = served.rt.model(served.name)
    stream = m.stream("the dog and the sun", max_tokens=4)
    events = list(stream)
    assert all(isinstance(e, Delta) for e in events[:-1])
    assert isinstance(events[-1], Done)
    assert stream.completion == events[-1].completion
    assert events[-1].completion.finish_reason is FinishReason.LENGTH
    assert [e.to_dict()["type"] for e in events] == ["delta"] * 4 + ["done"]


def test_a_model_that_is_not_loaded_has_no_handle(served):
    with pytest.raises(ModelNotFoundError):
        served.rt.model("nobody")


def test_every_asyncio_twin_answers_as_its_blocking_call(served):
    m = served.rt.model(served.name)
    messages = [{"role": "user", "content": "hello there"}]

    async def main() -> None:
        prompt = await m.atokenize("the moon and the tree")
        assert prompt == m.tokenize("the moon and the tree")
        assert await m.adetokenize(prompt) == m.detokenize(prompt)
        warmed = await m.aprefill(prompt)
        assert warmed.finish_key is not None and warmed.tokens == []
        hit = await m.acomplete(prompt, max_tokens=3)
        assert hit.cache.kind is HitKind.EXACT
        assert (await m.achat(messages, max_tokens=2)).tokens == m.chat(
            messages, max_tokens=2
        ).tokens
        events = [e async for e in m.achat_stream(messages, max_tokens=2)]
        assert isinstance(events[-1], Done)
        assert events[-1].completion.tokens == m.chat(messages, max_tokens=2).tokens
        assert await m.aembed("hello") == m.embed("hello")
        assert (await m.ainfo()).name == served.name
        assert await m.aevict() == 0

    asyncio.run(main())


def test_a_runtime_works_with_async_with(tmp_path):
    config = {
        "cache": {"tiers": [{"kind": "ram", "quota_mb": 16}]},
        "daemon": {"log_file": str(tmp_path / "log" / "erllama-py.log")},
    }

    async def main() -> list[int]:
        async with await erllama_py.astart(config) as rt:
            m = rt.load_model("s", backend="stub", n_ctx=128, n_batch=32)
            result = await m.acomplete("the cat", max_tokens=2)
            assert not rt.stopped
        assert rt.stopped
        return result.tokens

    assert len(asyncio.run(main())) == 2


def test_sampling_params_and_keyword_options_are_one_validated_set(served):
    m = served.rt.model(served.name)
    params = SamplingParams(temperature=0.8, seed=7)
    by_object = m.complete("the cat", max_tokens=6, sampling=params)
    by_keywords = m.complete("the cat", max_tokens=6, temperature=0.8, seed=7)
    assert by_object.tokens == by_keywords.tokens
    # A keyword overrides the object's field.
    greedy = m.complete("the cat", max_tokens=6, sampling=params, temperature=0.0)
    assert greedy.tokens == m.complete("the cat", max_tokens=6, seed=7).tokens
    with pytest.raises(InvalidRequestError) as info:
        m.complete("the cat", sampling={"temperature": 1.0})  # type: ignore[typeddict-item]
    assert info.value.param == "sampling"
    with pytest.raises(InvalidRequestError) as info:
        m.complete("the cat", temperature=-1.0)
    assert info.value.param == "temperature"


def test_numpy_integers_are_accepted_wherever_python_integers_are(served):
    m = served.rt.model(served.name)
    prompt = m.tokenize("the sun and the moon")
    as_numpy = np.asarray(prompt, dtype=np.int32)
    result = m.complete(as_numpy, max_tokens=np.int64(3), seed=np.uint32(5))
    assert result.tokens == m.complete(prompt, max_tokens=3, seed=5).tokens
    assert m.detokenize(list(as_numpy)) == m.detokenize(prompt)


def test_a_json_schema_that_is_not_an_object_is_a_clear_error(served):
    m = served.rt.model(served.name)
    with pytest.raises(InvalidRequestError) as info:
        m.complete("the cat", json_schema=[{"type": "string"}])  # type: ignore[arg-type]
    assert info.value.param == "json_schema"
    assert "JSON object" in str(info.value) and "list" in str(info.value)


def test_a_request_past_its_timeout_fails_and_the_model_serves_the_next(rt, load, wait_until):
    slow = load(rt, "stub", "slow", stub={"step_delay": 0.02})
    m = rt.model("slow")
    with pytest.raises(RequestTimeoutError) as info:
        m.complete("the cat", max_tokens=10_000, timeout=0.2)
    assert info.value.model == "slow" and info.value.request_id
    wait_until(lambda: m.info().active == 0, "the timed-out request freed its sequence")
    assert len(slow.complete("the dog", max_tokens=2).tokens) == 2


def test_a_queued_request_past_its_timeout_fails_without_running(rt, load, wait_until):
    load(rt, "stub", "one", n_seq_max=1, stub={"step_delay": 0.02})
    m = rt.model("one")
    busy = m.stream("the cat", max_tokens=10_000)
    next(busy)  # it holds the only sequence
    with pytest.raises(RequestTimeoutError):
        m.complete("the dog", max_tokens=2, timeout=0.1)
    assert m.info().requests_done == 0  # the queued one never ran
    busy.close()
    wait_until(lambda: m.info().active == 0, "the stream was cancelled")


def test_a_timeout_must_be_a_positive_number(served):
    m = served.rt.model(served.name)
    for bad in (0, -1.0, float("inf"), "soon"):
        with pytest.raises(InvalidRequestError) as info:
            m.complete("the cat", timeout=bad)  # type: ignore[arg-type]
        assert info.value.param == "timeout"


def test_results_serialise_to_plain_json(served):
    result = served.rt.model(served.name).complete("the cat and the sun", max_tokens=2)
    text = json.dumps(result.to_dict())
    back = json.loads(text)
    assert back["cache"] == {"kind": str(result.cache.kind), "prefix_len": result.cache.prefix_len}
    assert back["usage"]["total_tokens"] == result.usage.total_tokens


def test_logprobs_give_each_generated_token_and_its_most_likely_alternatives(served):
    m = served.rt.model(served.name)
    result = m.complete("the red cat and the dog", max_tokens=4, logprobs=3)
    assert result.logprobs is not None and len(result.logprobs) == len(result.tokens) == 4
    for token, entry in zip(result.tokens, result.logprobs, strict=True):
        assert entry.token == token and entry.logprob <= 0.0
        assert len(entry.top) == 3
        assert [t.logprob for t in entry.top] == sorted(
            (t.logprob for t in entry.top), reverse=True
        )
        assert entry.top[0].logprob >= entry.logprob
        if served.kind == "tiny":  # greedy on the model's logits: the best token is chosen
            assert entry.top[0].token == token and entry.top[0].logprob == entry.logprob
    # The same tokens as without logprobs; streamed deltas carry the same entries.
    assert result.tokens == m.complete("the red cat and the dog", max_tokens=4).tokens
    streamed = [
        e
        for e in m.stream("the red cat and the dog", max_tokens=4, logprobs=3)
        if isinstance(e, Delta)
    ]
    assert [x for e in streamed for x in (e.logprobs or [])] == result.logprobs
    assert m.complete("the red cat", max_tokens=2).logprobs is None
    json.dumps(result.to_dict())
    with pytest.raises(InvalidRequestError) as info:
        m.complete("the cat", logprobs=21)
    assert info.value.param == "logprobs"


def test_require_room_refuses_a_prompt_whose_max_tokens_do_not_fit(served):
    m = served.rt.model(served.name)
    prompt = m.tokenize("the cat and the dog")
    too_many = served.n_ctx - len(prompt) + 1
    with pytest.raises(erllama_py.ContextOverflowError) as info:
        m.complete(prompt, max_tokens=too_many, require_room=True)
    assert info.value.param == "max_tokens"
    # One token fewer fits.
    assert m.complete(prompt, max_tokens=too_many - 1, require_room=True, stop=["x"]) is not None


def test_a_full_queue_refuses_new_requests_at_once_and_serves_those_it_admitted(
    rt, load, wait_until
):
    load(rt, "stub", "busy", n_seq_max=1, max_queue=2, stub={"step_delay": 0.01})
    m = rt.model("busy")
    running = m.stream("the cat", max_tokens=10_000)
    next(running)  # holds the only sequence
    queued = [m.stream(f"queued {i}", max_tokens=3) for i in range(2)]
    wait_until(lambda: m.pending_len() == 2, "two requests queued")
    with pytest.raises(erllama_py.QueueFullError) as info:
        m.complete("one too many", max_tokens=3)
    assert info.value.max_queue == 2 and info.value.model == "busy"
    running.close()
    for stream in queued:
        events = list(stream)
        assert isinstance(events[-1], Done) and len(events[-1].completion.tokens) == 3


def test_prefill_saves_the_prompt_even_below_the_policy_thresholds(rt, load):
    load(rt, "stub", "strict", policy={"min_tokens": 1000, "cold_min_tokens": 1000})
    m = rt.model("strict")
    prompt = m.tokenize("a short prompt")
    warmed = m.prefill(prompt)
    assert warmed.finish_key is not None
    rt.cache.wait_idle()
    assert m.complete(prompt, max_tokens=2).cache == CacheHit("exact", len(prompt))
