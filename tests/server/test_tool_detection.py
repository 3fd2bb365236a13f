"""Finding tool calls without a model: the family a template implies, the start-of-reply
watch (a marker split across tokens is still found; a brace later in a reply is not a
call), the streaming scanner of call arguments, and parsing each family's syntax."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from erllama_py.model.testmodel import CHATML_TEMPLATE
from erllama_py.model.textstream import TextStream
from erllama_py.server.tool_stream import CallArgs, CallEnd, CallHead, CallScanner
from erllama_py.server.tool_syntax import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    StartWatch,
    syntax_for,
)
from erllama_py.server.tools import ToolChoice, ToolDef, call_grammar, parse_calls

TEMPLATES = Path(__file__).parents[1] / "model" / "chat_templates"
F = ToolDef("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}})
G = ToolDef("g", None, {})
START = LLAMA3.start
assert START is not None

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
arguments = st.dictionaries(st.text(max_size=6), json_values, max_size=4)


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def test_the_family_comes_from_the_template():
    def family(name: str) -> str:
        return syntax_for((TEMPLATES / name).read_text(encoding="utf-8")).family

    assert family("llama3.1.jinja") == "llama3"
    assert family("mistral-nemo.jinja") == "mistral"
    assert family("qwen2.5.jinja") == "hermes"
    assert family("gemma3.jinja") == "generic"  # no tool support: the generic prompt
    assert syntax_for(CHATML_TEMPLATE) is GENERIC
    assert syntax_for("chatml") is GENERIC and syntax_for(None) is GENERIC
    assert [m.text for m in LLAMA3.markers if not m.at_start] == ["<|python_tag|>"]
    assert HERMES.anywhere == GENERIC.anywhere == ("<tool_call>",)
    assert MISTRAL.anywhere == ("[TOOL_CALLS]",) and MISTRAL.start is None


@given(
    lead=st.text(alphabet=" \n\t", max_size=4),
    inner=st.text(alphabet=" \n", max_size=2),
    rest=st.text(max_size=20),
    cuts=st.lists(st.integers(0, 40), max_size=12),
)
def test_a_bare_json_call_at_the_start_is_found_however_it_is_split(lead, inner, rest, cuts):
    text = lead + "{" + inner + '"name": "f"' + rest
    watch = StartWatch(START)
    states = [watch.feed(piece) for piece in _split(text, cuts)]
    assert "text" not in states
    decided = states.index("call")  # once found, it stays found
    assert set(states[decided:]) == {"call"}
    assert watch.lead == lead


@given(
    first=st.characters(blacklist_characters="{", blacklist_categories=("Zs", "Cc")),
    middle=st.text(max_size=10),
    cuts=st.lists(st.integers(0, 40), max_size=12),
)
def test_a_brace_later_in_the_reply_never_starts_a_call(first, middle, cuts):
    text = first + middle + '{"name": "f", "parameters": {}}'
    watch = StartWatch(START)
    states = [watch.feed(piece) for piece in _split(text, cuts)]
    assert "call" not in states and states[-1] == "text"


def test_a_reply_that_stays_blank_or_a_prefix_is_undecided():
    watch = StartWatch(START)
    assert watch.feed("  \n") == "undecided"
    assert watch.feed(' { "na') == "undecided"
    assert watch.feed("m") == "undecided"
    assert watch.feed('e"') == "call"
    assert StartWatch(START).feed('{"nope"') == "text"


@given(
    syntax=st.sampled_from([GENERIC, HERMES, LLAMA3, MISTRAL]),
    before=st.text(alphabet="abc {}<>[]|_\n", max_size=12),
    cuts=st.lists(st.integers(0, 60), max_size=20),
)
def test_a_text_marker_split_across_tokens_stops_the_free_run_right_before_it(syntax, before, cuts):
    """What ``auto`` gives the engine as stop sequences: each family's marker, found
    whatever the token boundaries, the text shown being exactly what came before it."""
    [marker] = syntax.anywhere
    stream = TextStream([*syntax.anywhere, "STOP"])
    shown = ""
    for piece in _split(before + marker + '{"name": "f"}', cuts):
        shown += stream.feed(piece.encode())
    shown += stream.flush()
    assert stream.match is not None
    cut = (before + marker).find(marker)
    assert stream.match.stop == marker and stream.match.position == cut
    assert shown == before[:cut]


def _calls_text(family: str, calls: list[tuple[str, dict[str, object]]]) -> str:
    key = "parameters" if family == "llama3" else "arguments"
    bodies = [json.dumps({"name": n, key: a}) for n, a in calls]
    if family == "hermes":
        return "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in bodies)
    if family == "mistral":
        return "[TOOL_CALLS][" + ", ".join(bodies) + "]"
    return "\n".join(bodies)


@given(
    family=st.sampled_from(["hermes", "mistral", "llama3"]),
    calls=st.lists(st.tuples(st.sampled_from(["f", "g"]), arguments), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 400), max_size=30),
)
def test_the_scanner_streams_each_call_whatever_the_token_boundaries(family, calls, cuts):
    text = _calls_text(family, calls)
    scanner = CallScanner()
    events = [e for piece in _split(text, cuts) for e in scanner.feed(piece)]
    assert not scanner.failed
    heads = [e for e in events if isinstance(e, CallHead)]
    assert [(h.index, h.name) for h in heads] == [(i, n) for i, (n, _) in enumerate(calls)]
    for i, (_, args) in enumerate(calls):
        own = [e for e in events if getattr(e, "index", None) == i]
        assert isinstance(own[0], CallHead) and isinstance(own[-1], CallEnd)
        fragments = own[1:-1]
        assert all(isinstance(f, CallArgs) and f.text for f in fragments)
        assert json.loads("".join(f.text for f in fragments)) == args  # type: ignore[union-attr]
    parsed = parse_calls(text, [F, G], "call_")
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls


def test_the_scanner_gives_up_on_a_shape_the_grammar_does_not_write():
    scanner = CallScanner()
    assert scanner.feed('{"name": "f", "arguments": 3}') == [CallHead(0, "f")]
    assert scanner.failed


def test_parse_reads_every_family_and_only_complete_offered_calls():
    llama = '{"name": "f", "parameters": {"a": 1}}'
    mistral = '[TOOL_CALLS][{"name": "f", "arguments": {"a": 2}}, {"name": "g", "arguments": {}}]'
    assert [json.loads(c.arguments) for c in parse_calls(llama, [F], "call_")] == [{"a": 1}]
    assert [(c.name, c.arguments) for c in parse_calls(mistral, [F, G], "x")] == [
        ("f", '{"a": 2}'),
        ("g", "{}"),
    ]
    assert parse_calls('{"name": "f", "parameters": {"a": 1}', [F], "call_") == []
    assert parse_calls('[{"name": "h", "arguments": {}}]', [F], "call_") == []


def test_each_family_grammar_writes_its_own_shape():
    one = ToolChoice("required", parallel=False)
    assert 'tool-calls ::= "[" tool-call-json "]"' in call_grammar([F], one, MISTRAL)
    assert "tool-calls ::= tool-call-json\n" in call_grammar([F], one, LLAMA3)
    assert '"\\"parameters\\""' in call_grammar([F], one, LLAMA3)
    assert '"\\"arguments\\""' in call_grammar([F], one, HERMES)
    assert "<|python_tag|>" not in call_grammar([F], one, LLAMA3)
