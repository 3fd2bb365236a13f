"""Tool calls in each family's own syntax, with real llama.cpp (the tiny random GGUF carrying
Llama 3.1's, Mistral Nemo's and Qwen 2.5's templates, and their markers as control tokens):
the family is read from the template, ``auto`` switches to the tools' grammar on the
family's marker (a control token, text, or a bare JSON call at the start of the reply) and
on nothing else, and calls are streamed as their arguments are generated.

The random model never chooses a call by itself, so a grammar nudges its first run into
writing a marker, as a model choosing a call would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from server_helpers import server_config

from erllama_py.config import load_config
from erllama_py.errors import InvalidRequestError
from erllama_py.model.testmodel import write_test_model
from erllama_py.server.chat_run import (
    ArgsOut,
    CallDone,
    CallStart,
    ChatEvent,
    ChatJob,
    Finished,
    TextOut,
    complete_chat,
    stream_chat,
    tool_watch,
)
from erllama_py.server.serve import Serving, start_serving
from erllama_py.server.tools import ToolChoice, ToolDef

TEMPLATES = Path(__file__).parents[1] / "model" / "chat_templates"
CONTROL = ["<|python_tag|>", "[TOOL_CALLS]"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "days"],
        },
    },
}
TOOLS = [ToolDef("get_weather", None, WEATHER["function"]["parameters"])]  # type: ignore[arg-type]
ASK = [{"role": "user", "content": "what is the weather in paris"}]


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Serving]:
    root = tmp_path_factory.mktemp("families")
    config = server_config(root, tiny_model_path)
    for name, template in (
        ("llama3", "llama3.1.jinja"),
        ("mistral", "mistral-nemo.jinja"),
        ("qwen", "qwen2.5.jinja"),
        ("gemma", "gemma3.jinja"),
    ):
        path = write_test_model(
            root / f"{name}.gguf",
            chat_template=(TEMPLATES / template).read_text(encoding="utf-8"),
            control_tokens=CONTROL,
        )
        config["models"].append(
            {"name": name, "model_path": str(path), "n_ctx": 4096, "n_batch": 256,
             "n_seq_max": 2, "n_threads": 1}
        )  # fmt: skip
    s = start_serving(load_config(config))
    yield s
    s.stop()


@pytest.fixture
def client(serving: Serving) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{serving.url}/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def _job(serving: Serving, model: str, nudge: str, max_tokens: int = 200) -> ChatJob:
    options: Any = {"grammar": nudge, "max_tokens": max_tokens, "temperature": 0.0}
    return ChatJob(
        serving.runtime.model(model), list(ASK), TOOLS, ToolChoice("auto", parallel=False), options
    )  # type: ignore[arg-type]


def _weather(arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Rome", "Oslo")
    assert isinstance(args["days"], int)
    return args


def _events(job: ChatJob) -> list[ChatEvent]:
    async def run() -> list[ChatEvent]:
        return [e async for e in stream_chat(job)]

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("model", "family", "control"),
    [("llama3", "llama3", "<|python_tag|>"), ("mistral", "mistral", "[TOOL_CALLS]"),
     ("qwen", "hermes", None), ("gemma", "generic", None), ("tiny", "generic", None)],
)  # fmt: skip
def test_the_family_comes_from_the_template_and_control_markers_from_the_vocabulary(
    serving, model, family, control
):
    m = serving.runtime.model(model)
    watch = asyncio.run(tool_watch(m))
    assert watch.syntax.family == family
    if control is None:
        assert watch.tokens == frozenset()
    else:
        assert watch.tokens == frozenset(m.tokenize(control, False, True))
        assert control in watch.stops  # spelled out in text, it is seen too


def test_a_stop_token_ends_generation_on_the_token_and_keeps_it(serving):
    m = serving.runtime.model("tiny")
    free = m.complete("the cat", max_tokens=8, temperature=0)
    token = free.tokens[3]
    stopped = m.complete("the cat", max_tokens=8, temperature=0, stop_tokens=[token])
    cut = free.tokens.index(token) + 1
    assert stopped.tokens == free.tokens[:cut]
    assert stopped.finish_reason == "stop" and stopped.stop_sequence is None
    with pytest.raises(InvalidRequestError, match="stop_tokens"):
        m.complete("the cat", max_tokens=2, stop_tokens=["x"])


@pytest.mark.parametrize(("model", "marker"), [("llama3", "<|python_tag|>"),
                                              ("mistral", "[TOOL_CALLS]")])  # fmt: skip
def test_auto_switches_to_the_grammar_on_a_control_token_marker(serving, model, marker):
    nudge = f'root ::= "let me check " "{marker}" [a-z]*'
    outcome = asyncio.run(complete_chat(_job(serving, model, nudge)))
    assert outcome.text == "let me check "
    assert outcome.finish == "tool_calls"
    [call] = outcome.calls
    assert call.name == "get_weather"
    _weather(call.arguments)
    first, rest = outcome.results
    watch = asyncio.run(tool_watch(serving.runtime.model(model)))
    # The grammar let the model write the marker as its control token (no text at all):
    # the stop token caught it, and the call went on from exactly that state.
    assert first.tokens[-1] in watch.tokens and first.stop_sequence is None
    assert rest.usage.prompt_tokens == first.usage.prompt_tokens + len(first.tokens)
    assert rest.usage.cached_tokens >= rest.usage.prompt_tokens - 1


@pytest.mark.parametrize("lead", ["", "\\n ", " "])
def test_a_reply_that_opens_with_a_bare_json_call_is_a_call(serving, lead):
    nudge = f'root ::= "{lead}" "{{" " "? "\\"name\\"" [a-z]*'
    outcome = asyncio.run(complete_chat(_job(serving, "llama3", nudge)))
    assert outcome.text == ""
    assert outcome.finish == "tool_calls"
    [call] = outcome.calls
    _weather(call.arguments)
    first, rest = outcome.results
    # Stopped once its start was decided (unless it ended by itself first); the call was
    # generated from the prompt plus the blanks before the brace, restored from the cache.
    assert first.finish_reason in ("cancelled", "stop")
    assert first.usage.prompt_tokens <= rest.usage.prompt_tokens
    assert rest.usage.prompt_tokens <= first.usage.prompt_tokens + len(lead)
    assert rest.usage.cached_tokens > 0


@pytest.mark.parametrize("model", ["llama3", "qwen"])
def test_a_brace_later_in_the_reply_is_only_text(serving, model):
    nudge = 'root ::= "see " "{\\"name\\": \\"get_weather\\"" [a-z]*'
    outcome = asyncio.run(complete_chat(_job(serving, model, nudge, max_tokens=48)))
    assert outcome.calls == [] and outcome.finish == "length"
    assert outcome.text.startswith('see {"name": "get_weather"')
    assert len(outcome.results) == 1  # no second run


def test_a_reply_that_is_only_blank_so_far_is_text_when_it_ends(serving):
    outcome = asyncio.run(complete_chat(_job(serving, "llama3", 'root ::= "  " [a-z]*', 2)))
    assert outcome.calls == [] and outcome.text.startswith("  ")


def test_auto_streams_the_text_then_the_call_in_fragments(serving):
    events = _events(_job(serving, "llama3", 'root ::= "let me check " "<|python_tag|>" [a-z]*'))
    kinds = [type(e) for e in events]
    start = kinds.index(CallStart)
    assert set(kinds[:start]) == {TextOut}
    assert "".join(e.text for e in events[:start]) == "let me check "  # type: ignore[union-attr]
    fragments = [e for e in events if isinstance(e, ArgsOut)]
    assert len(fragments) > 1
    assert kinds[start + 1 : start + 1 + len(fragments)] == [ArgsOut] * len(fragments)
    assert kinds[-2:] == [CallDone, Finished]
    head, outcome = events[start], events[-1]
    assert isinstance(head, CallStart) and isinstance(outcome, Finished)
    [call] = outcome.outcome.calls
    assert call.id == head.id and call.name == head.name == "get_weather"
    assert json.loads("".join(f.text for f in fragments)) == json.loads(call.arguments)


@pytest.mark.parametrize("model", ["llama3", "mistral", "qwen"])
def test_forced_calls_in_each_family_validate_and_stream_in_fragments(client, model):
    kwargs: dict[str, Any] = {
        "model": model, "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
        "parallel_tool_calls": False, "max_tokens": 200, "temperature": 0,
    }  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert whole is not None
    [call] = whole
    args = _weather(call.function.arguments)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    frags = [f for c in chunks for ch in c.choices for f in ch.delta.tool_calls or []]
    assert frags[0].id and frags[0].type == "function" and frags[0].function.name == "get_weather"
    rest = frags[1:]
    assert len(rest) > 1 and all(f.id is None and f.function.name is None for f in rest)
    assert {f.index for f in frags} == {0}
    assert json.loads("".join(f.function.arguments or "" for f in frags)) == args
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
