"""OpenAI tool calls, judged by the official `openai` client: forced calls (``required``,
named) whose arguments validate against the function's schema, streamed fragments that
reassemble to the same call, ``auto``, a tool-result turn through a template with tool
support (Qwen 2.5's) and through one without (chatml: the generic prompt), and refusals.

The models are the tiny random GGUF (real llama.cpp): its text is gibberish, which is
the point: only the grammar makes the calls valid.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from server_helpers import server_config

from erllama_py.config import load_config
from erllama_py.model.testmodel import write_test_model
from erllama_py.server.chat_run import ChatJob, complete_chat
from erllama_py.server.serve import Serving, start_serving
from erllama_py.server.tools import TOOL_CALL_OPEN, ToolChoice, ToolDef

QWEN = Path(__file__).parents[1] / "model" / "chat_templates" / "qwen2.5.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
            },
            "required": ["city", "days", "metric"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "what is the weather in paris"}]
# A GGUF's template is untrusted data: this one tries to leave the sandbox, then loops.
HOSTILE = (
    "{% if messages[0].content == 'escape' %}{{ ().__class__.__base__.__subclasses__() }}"
    "{% else %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}{% endif %}"
)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Serving]:
    root = tmp_path_factory.mktemp("tools")
    qwen = write_test_model(root / "qwen.gguf", chat_template=QWEN.read_text(encoding="utf-8"))
    hostile = write_test_model(root / "hostile.gguf", chat_template=HOSTILE)
    config = server_config(root, tiny_model_path)
    for name, path in (("qwen", qwen), ("chatml", tiny_model_path), ("hostile", hostile)):
        config["models"].append(
            {
                "name": name,
                "model_path": str(path),
                "n_ctx": 2048,
                "n_batch": 256,
                "n_seq_max": 2,
                "n_threads": 1,
            }
        )
    s = start_serving(load_config(config))
    yield s
    s.stop()


def _valid_weather(arguments: str) -> dict[str, Any]:
    """The arguments parse and validate against WEATHER's schema."""
    args = json.loads(arguments)
    assert set(args) <= {"city", "days", "metric"} and {"city", "days", "metric"} <= set(args)
    assert args["city"] in ("Paris", "Rome", "Oslo")
    assert isinstance(args["days"], int) and not isinstance(args["days"], bool)
    assert isinstance(args["metric"], bool)
    return args


@pytest.mark.parametrize("model", ["qwen", "chatml"])
def test_a_required_tool_call_has_arguments_that_validate(client, http, model):
    raw = http.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": ASK,
            "tools": [WEATHER],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 200,
            "temperature": 0,
        },
    )
    assert raw.status_code == 200, raw.text
    reply = ChatCompletion.model_validate(raw.json())
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    _valid_weather(call.function.arguments)


def test_a_named_tool_is_the_one_called_among_several(client):
    reply = client.chat.completions.create(
        model="qwen", messages=ASK, tools=[WEATHER, CLOCK], max_tokens=200, temperature=0.8,
        seed=3, tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


def test_streamed_tool_call_fragments_reassemble_to_the_same_call(client):
    kwargs: dict[str, Any] = {
        "model": "qwen", "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
        "parallel_tool_calls": False, "max_tokens": 200, "temperature": 0,
    }  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for choice in c.choices:
            for frag in choice.delta.tool_calls or []:
                call = calls.setdefault(frag.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += frag.id or ""
                if frag.function is not None:
                    call["name"] += frag.function.name or ""
                    call["arguments"] += frag.function.arguments or ""
    assert list(calls) == [0]
    fragments = [f for c in chunks for ch in c.choices for f in ch.delta.tool_calls or []]
    assert len([f for f in fragments if f.function and f.function.arguments]) > 1
    assert calls[0]["name"] == whole.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)
    assert calls[0]["id"].startswith("call_")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_parallel_calls_are_all_complete_and_indexed(client):
    reply = client.chat.completions.create(
        model="qwen", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
        max_tokens=120, temperature=1.0, seed=11,
    )  # fmt: skip
    calls = reply.choices[0].message.tool_calls
    assert calls  # at least one call; each one complete
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        args = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "get_time") and isinstance(args, dict)


@pytest.mark.parametrize("model", ["qwen", "chatml"])
def test_a_tool_result_turn_renders_and_is_served_partly_from_the_cache(client, model):
    first = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_tokens=200, temperature=0,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
    ]
    second = client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_auto_lets_the_model_answer_in_text(client):
    reply = client.chat.completions.create(
        model="qwen", messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=6,
        temperature=0,
    )  # fmt: skip
    choice = reply.choices[0]
    # The random model never writes the marker, so the answer is text.
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert choice.message.content


def test_tool_choice_none_offers_no_tools(client):
    plain = client.chat.completions.create(model="qwen", messages=ASK, max_tokens=4, temperature=0)
    none = client.chat.completions.create(
        model="qwen", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=4,
        temperature=0,
    )  # fmt: skip
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_bad_tool_requests_are_400s(client):
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model="qwen", messages=ASK, tools=[WEATHER], max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "nobody"}},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        client.chat.completions.create(
            model="qwen", messages=ASK, tool_choice="required", max_tokens=4
        )
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(
            model="qwen", messages=ASK, tools=[WEATHER], n=2, max_tokens=4
        )


def test_auto_switches_to_the_grammar_once_the_output_starts_a_call(serving):
    """A grammar makes the first run write text then the marker (as a model choosing a
    call would); the call is then generated from exactly that state under the tools'
    grammar, and the first run's text stays the message's content."""
    m = serving.runtime.model("qwen")
    tools = [ToolDef(WEATHER["function"]["name"], None, WEATHER["function"]["parameters"])]
    nudge = f'root ::= "let me check " "{TOOL_CALL_OPEN}" [a-z]*'
    job = ChatJob(m, list(ASK), tools, ToolChoice("auto", parallel=False),
                  {"grammar": nudge, "max_tokens": 200, "temperature": 0.0})  # fmt: skip
    outcome = asyncio.run(complete_chat(job))
    assert outcome.text == "let me check "
    assert outcome.finish == "tool_calls"
    [call] = outcome.calls
    assert call.name == "get_weather"
    _valid_weather(call.arguments)
    first, rest = outcome.results
    assert first.stop_sequence == TOOL_CALL_OPEN
    # The continuation restored the first run's state instead of prefilling it again (all
    # but the last sampled token, which the first run never decoded).
    assert rest.usage.cached_tokens >= rest.usage.prompt_tokens - 1
    assert outcome.completion_tokens == first.usage.completion_tokens + rest.usage.completion_tokens


@pytest.mark.parametrize("attack", ["escape", "loop"])
def test_a_hostile_gguf_template_is_a_400_and_the_model_serves_on(client, attack):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="hostile", messages=[{"role": "user", "content": attack}], max_tokens=2
        )
    assert "template" in info.value.body["message"]
    text = client.completions.create(model="hostile", prompt="the cat", max_tokens=2)
    assert text.usage.completion_tokens == 2


def test_developer_messages_are_system_and_text_parts_are_flattened(client):
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    parts = [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
        },
        {"role": "user", "content": "hi there"},
    ]
    a = client.chat.completions.create(model="qwen", messages=system, max_tokens=1)
    b = client.chat.completions.create(model="qwen", messages=parts, max_tokens=1)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model="qwen", messages=image, max_tokens=1)


def test_a_schema_with_local_definitions_constrains_the_call(client):
    unit = {
        "type": "function",
        "function": {
            "name": "convert",
            "parameters": {
                "type": "object",
                "$defs": {"Unit": {"type": "string", "enum": ["km", "mi"]}},
                "properties": {"to": {"$ref": "#/$defs/Unit"}},
                "required": ["to"],
            },
        },
    }
    reply = client.chat.completions.create(
        model="qwen", messages=ASK, tools=[unit, WEATHER], max_tokens=100, temperature=0,
        tool_choice={"type": "function", "function": {"name": "convert"}},
    )  # fmt: skip
    [call] = reply.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) in ({"to": "km"}, {"to": "mi"})


def test_tools_reach_the_model_through_the_public_api_too(serving):
    rt = serving.runtime
    plain = rt.model("chatml").chat_tokens(ASK)
    with_tools = rt.model("chatml").chat_tokens(ASK, tools=[WEATHER])
    assert len(with_tools) > len(plain) + 20  # the generic tool prompt: a system message
    result = rt.chat("chatml", ASK, tools=[WEATHER], max_tokens=1)
    assert result.usage.prompt_tokens == len(with_tools)
