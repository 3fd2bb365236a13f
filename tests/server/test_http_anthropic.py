"""The Anthropic Messages API, judged by the official `anthropic` client and its types:
text, streaming events in order, a forced tool_use, a tool_result turn, count_tokens,
usage cache fields that grow over a conversation, and errors (envelope, 401, 404, 400,
529 with retry-after on a full queue). The server here requires an API key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter
from server_helpers import server_config

from erllama_py.config import load_config
from erllama_py.model.testmodel import write_test_model
from erllama_py.server.serve import Serving, start_serving

KEY = "sk-ant-test-key"
QWEN = Path(__file__).parents[1] / "model" / "chat_templates" / "qwen2.5.jinja"
WEATHER = {
    "name": "get_weather",
    "description": "The weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Rome"]},
            "days": {"type": "integer"},
        },
        "required": ["city", "days"],
    },
}
ASK = [{"role": "user", "content": "what is the weather in paris"}]
GREEDY = {"temperature": 0}  # the client no longer sends sampling fields; the server takes them
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Serving]:
    root = tmp_path_factory.mktemp("anthropic")
    qwen = write_test_model(root / "qwen.gguf", chat_template=QWEN.read_text(encoding="utf-8"))
    config = server_config(root, tiny_model_path, api_keys=[KEY])
    config["models"].append(
        {
            "name": "qwen",
            "model_path": str(qwen),
            "n_ctx": 2048,
            "n_batch": 256,
            "n_seq_max": 2,
            "n_threads": 1,
        }
    )
    s = start_serving(load_config(config))
    yield s
    s.stop()


@pytest.fixture
def claude(serving: Serving) -> Iterator[anthropic.Anthropic]:
    c = anthropic.Anthropic(base_url=serving.url, api_key=KEY, max_retries=0)
    yield c
    c.close()


@pytest.fixture
def raw(serving: Serving) -> Iterator[httpx.Client]:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    with httpx.Client(base_url=serving.url, timeout=60.0, headers=headers) as c:
        yield c


def _events(response: Any) -> list[tuple[str, dict[str, Any]]]:
    out = []
    name = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[len("data: ") :])))
    return out


def test_a_text_message_validates_as_the_clients_type_with_its_headers(claude):
    response = claude.messages.with_raw_response.create(
        model="tiny", max_tokens=5, messages=ASK, extra_body=GREEDY
    )
    assert response.headers["request-id"].startswith("req_")
    sent = response.http_request.headers["anthropic-version"]
    assert response.headers["anthropic-version"] == sent  # accepted and echoed
    message = response.parse()
    Message.model_validate(message.model_dump())
    assert message.id.startswith("msg_") and message.role == "assistant"
    assert message.model == "tiny" and message.stop_reason == "max_tokens"
    assert [b.type for b in message.content] == ["text"]
    usage = message.usage
    assert usage.output_tokens == 5
    assert usage.cache_read_input_tokens is not None
    assert usage.cache_creation_input_tokens is not None
    count = claude.messages.count_tokens(model="tiny", messages=ASK)
    MessageTokensCount.model_validate(count.model_dump())
    total = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    assert count.input_tokens == total


def test_system_blocks_stop_sequences_and_end_turn(claude):
    message = claude.messages.create(
        model="stub", max_tokens=40, messages=ASK, extra_body=GREEDY,
        system=[{"type": "text", "text": "be brief"}, {"type": "text", "text": "and kind"}],
    )  # fmt: skip
    words = message.content[0].text.split()
    assert len(words) > 3
    stopped = claude.messages.create(
        model="stub", max_tokens=40, messages=ASK, extra_body=GREEDY,
        system=[{"type": "text", "text": "be brief"}, {"type": "text", "text": "and kind"}],
        stop_sequences=[words[2]],
    )  # fmt: skip
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == words[2]
    assert words[2] not in stopped.content[0].text


def test_streaming_events_come_in_order_and_validate(raw, claude):
    body = {"model": "tiny", "max_tokens": 6, "messages": ASK, "stream": True, "temperature": 0}
    with raw.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["request-id"].startswith("req_")
        events = _events(response)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    for name, data in events:
        assert data["type"] == name
        if name != "ping":
            EVENTS.validate_python(data)
    deltas = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "max_tokens" and final["usage"]["output_tokens"] == 6
    whole = claude.messages.create(model="tiny", max_tokens=6, messages=ASK, extra_body=GREEDY)
    assert "".join(deltas) == whole.content[0].text
    with claude.messages.stream(model="tiny", max_tokens=6, messages=ASK, extra_body=GREEDY) as s:
        assert s.get_final_message().content[0].text == whole.content[0].text


@pytest.mark.parametrize(
    "choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}], ids=["any", "tool"]
)
def test_a_forced_tool_use_has_an_input_that_validates(claude, choice):
    message = claude.messages.create(
        model="qwen", max_tokens=200, messages=ASK, tools=[WEATHER], extra_body=GREEDY,
        tool_choice={**choice, "disable_parallel_tool_use": True},
    )  # fmt: skip
    Message.model_validate(message.model_dump())
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert block.name == "get_weather"
    assert block.input["city"] in ("Paris", "Rome") and isinstance(block.input["days"], int)


def test_a_streamed_tool_use_arrives_in_input_json_fragments(raw, claude):
    """The call's input is streamed as it is generated: several ``input_json_delta``
    events in one ``tool_use`` block, which reassemble to the non-streaming call."""
    request = {"model": "qwen", "max_tokens": 200, "messages": ASK, "tools": [WEATHER],
               "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}  # fmt: skip
    whole = claude.messages.create(**request, extra_body=GREEDY)
    [use] = whole.content
    with raw.stream("POST", "/v1/messages", json={**request, **GREEDY, "stream": True}) as r:
        events = _events(r)
    for _, data in events:
        if data["type"] != "ping":
            EVENTS.validate_python(data)
    names = [n for n, _ in events]
    n = len(names) - 5
    assert n > 1  # more than one fragment
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * n,
                     "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    start = events[1][1]["content_block"]
    assert start["type"] == "tool_use" and start["input"] == {} and start["name"] == use.name
    fragments = [data["delta"] for _, data in events[2 : 2 + n]]
    assert {f["type"] for f in fragments} == {"input_json_delta"}
    assert json.loads("".join(f["partial_json"] for f in fragments)) == use.input
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    # The official client's stream accumulates the same fragments into the same call.
    with claude.messages.stream(**request, extra_body=GREEDY) as stream:
        deltas = [e for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert len(deltas) == n
    [streamed] = final.content
    assert streamed.type == "tool_use" and streamed.name == use.name
    assert streamed.input == use.input and streamed.id.startswith("toolu_")
    assert final.stop_reason == "tool_use"


def test_a_tool_result_turn_and_cache_reads_that_grow_over_a_conversation(claude):
    conversation: list[Any] = list(ASK)
    reads = []
    first = claude.messages.create(
        model="qwen", max_tokens=200, messages=conversation, tools=[WEATHER], extra_body=GREEDY,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )  # fmt: skip
    reads.append(first.usage.cache_read_input_tokens)
    use = first.content[0]
    conversation += [
        {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21C"},
        ]},
    ]  # fmt: skip
    for turn in range(2):
        reply = claude.messages.create(
            model="qwen", max_tokens=4, messages=conversation, tools=[WEATHER], extra_body=GREEDY
        )
        Message.model_validate(reply.model_dump())
        reads.append(reply.usage.cache_read_input_tokens)
        text = reply.content[0].text if reply.content[0].type == "text" else ""
        conversation += [
            {"role": "assistant", "content": text or "ok"},
            {"role": "user", "content": f"and tomorrow {turn}"},
        ]
    assert reads[1] > reads[0] and reads[2] > reads[1]
    counted = claude.messages.count_tokens(model="qwen", messages=conversation, tools=[WEATHER])
    assert counted.input_tokens > reads[2]


def test_an_agents_cache_control_and_thinking_do_not_change_the_prompt(claude):
    # Claude Code and friends mark blocks with cache_control, may ask for extended
    # thinking, and send earlier thinking blocks back: the markers and the thinking
    # config are accepted and ignored (the token-exact cache needs no hints; the model
    # produces no thinking), thinking blocks are dropped, and the prompt is token for
    # token the one without them.
    ephemeral = {"type": "ephemeral"}
    plain_system = [{"type": "text", "text": "You answer about the weather."}]
    marked_system = [{**plain_system[0], "cache_control": ephemeral}]
    plain: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "weather in rome?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]},
        {"role": "user", "content": [{"type": "text", "text": "and paris?"}]},
    ]
    marked: list[Any] = [
        {"role": "user", "content": [{**plain[0]["content"][0], "cache_control": ephemeral}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "The user asks about Rome.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Sunny."},
        ]},
        {"role": "user", "content": [{**plain[2]["content"][0], "cache_control": ephemeral}]},
    ]  # fmt: skip
    tools = [{**WEATHER, "cache_control": ephemeral}]
    counts = [
        claude.messages.count_tokens(model="qwen", system=system, messages=messages, tools=t)
        for system, messages, t in (
            (plain_system, plain, [WEATHER]),
            (marked_system, marked, tools),
        )
    ]
    assert counts[0].input_tokens == counts[1].input_tokens
    thinking = {"thinking": {"type": "enabled", "budget_tokens": 1024}}
    replies = [
        claude.messages.create(
            model="qwen", max_tokens=6, system=system, messages=messages, extra_body=GREEDY,
            **extra,
        )
        for system, messages, extra in (
            (plain_system, plain, {}), (marked_system, marked, thinking),
        )
    ]  # fmt: skip
    for reply in replies:
        Message.model_validate(reply.model_dump())
        assert [block.type for block in reply.content] == ["text"]
    assert replies[1].content[0].text == replies[0].content[0].text
    assert replies[1].usage.input_tokens == replies[0].usage.input_tokens


def test_errors_are_in_anthropics_envelope(serving, raw, claude):
    with pytest.raises(anthropic.AuthenticationError) as auth:
        anthropic.Anthropic(base_url=serving.url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=4, messages=ASK
        )
    assert auth.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="nobody", max_tokens=4, messages=ASK)
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    no_max = raw.post("/v1/messages", json={"model": "tiny", "messages": ASK})
    assert no_max.status_code == 400
    body = no_max.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    assert body["request_id"] == no_max.headers["request-id"]
    image = [{"role": "user", "content": [{"type": "image", "source": {}}]}]
    with pytest.raises(anthropic.BadRequestError, match="image blocks are not supported"):
        claude.messages.create(model="tiny", max_tokens=4, messages=image)
    with pytest.raises(anthropic.BadRequestError, match="not in tools"):
        claude.messages.create(model="qwen", max_tokens=4, messages=ASK, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "nobody"})  # fmt: skip
    # The OpenAI family keeps its own envelope on the same server.
    openai_missing = raw.post("/v1/chat/completions", json={"model": "nobody", "messages": ASK})
    assert openai_missing.status_code == 404 and "type" not in openai_missing.json()


def test_a_full_queue_is_a_529_overloaded_error_with_retry_after(serving, raw, wait_until, idle):
    slow = serving.runtime.model("slow")  # one sequence, a queue of two
    body = {"model": "slow", "max_tokens": 60, "messages": [{"role": "user", "content": "hold"}]}
    headers = {"x-api-key": KEY}
    url = f"{serving.url}/v1/messages"
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(httpx.post, url, json=body, headers=headers, timeout=60)
        wait_until(lambda: slow.info().active == 1, "one request runs")
        queued = [
            pool.submit(httpx.post, url, headers=headers, timeout=60,
                        json={**body, "max_tokens": 2,
                              "messages": [{"role": "user", "content": f"queued {i}"}]})
            for i in range(2)
        ]  # fmt: skip
        wait_until(lambda: slow.pending_len() == 2, "two requests queued")
        refused = raw.post("/v1/messages", json=body)
        assert refused.status_code == 529
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "overloaded_error"
        assert running.result().status_code == 200
        assert [q.result().status_code for q in queued] == [200, 200]
    idle("slow")
