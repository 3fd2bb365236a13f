"""The tool-call grammar and parser without a model: what the grammar admits is checked by
llama.cpp's own GBNF parser elsewhere (tests/server/test_http_tools.py); here, what the
server builds and reads back."""

from __future__ import annotations

import json

import pytest

from erllama_py.errors import InvalidRequestError
from erllama_py.server.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolChoice,
    ToolDef,
    call_grammar,
    continuation_grammar,
    parse_calls,
)

F = ToolDef("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}})
G = ToolDef("g", "gee", {})


def _block(body: object) -> str:
    return TOOL_CALL_OPEN + (body if isinstance(body, str) else json.dumps(body)) + TOOL_CALL_CLOSE


def test_parse_keeps_complete_calls_of_offered_tools_with_fresh_ids():
    text = (
        "preamble "
        + _block({"name": "f", "arguments": {"a": 1}})
        + "\n"
        + _block({"name": "nobody", "arguments": {}})  # not offered
        + _block('{"name": "f", "arguments": ')  # broken JSON
        + _block({"name": "g", "arguments": '{"b": true}'})  # arguments as a JSON string
        + TOOL_CALL_OPEN
        + '{"name": "f"'  # cut off: no closing marker
    )
    calls = parse_calls(text, [F, G], "call_")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"a": 1}),
        ("g", {"b": True}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert calls[1].input() == {"b": True}


def test_grammars_name_only_the_offered_tools_and_repeat_only_when_parallel():
    both = call_grammar([F, G], ToolChoice("required"))
    assert '"\\"f\\""' in both and '"\\"g\\""' in both and '("\\n" tool-call-block)*' in both
    named = call_grammar([F, G], ToolChoice("named", "g", parallel=False))
    assert '"\\"g\\""' in named and '"\\"f\\""' not in named
    assert '("\\n" tool-call-block)*' not in named
    after = continuation_grammar([F], ToolChoice("auto", parallel=False))
    assert after.startswith('root ::= "\\n"? tool-call-json "\\n"? "</tool_call>"\n')


def test_local_refs_resolve_once_the_parameters_are_nested():
    tool = ToolDef("h", None, {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
        "$defs": {"P": {"enum": ["x", "y"]}},
    })  # fmt: skip
    grammar = call_grammar([tool, F], ToolChoice("required"))
    assert '"\\"x\\"" | "\\"y\\""' in grammar


def test_refusals():
    with pytest.raises(InvalidRequestError, match="not in tools"):
        ToolChoice("named", "zed").offered([F])
    with pytest.raises(InvalidRequestError, match="cannot be compiled"):
        call_grammar([ToolDef("b", None, {"$ref": "#/nowhere"})], ToolChoice("required"))
    with pytest.raises(InvalidRequestError, match="at least one tool"):
        call_grammar([], ToolChoice("required"))
