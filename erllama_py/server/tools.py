"""Tool calls, shared by both API families: the calls' grammar, their parsing, the choice.

A tool call is written in the syntax of the model's family
(`erllama_py.server.tool_syntax`): by default
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (`TOOL_CALL_OPEN`,
the marker), Qwen's and Hermes' format and the one the generic tool prompt asks
for (`erllama_py.model.jinja_chat`); Llama 3's bare ``{"name": ...,
"parameters": ...}``; Mistral's ``[TOOL_CALLS][{...}, ...]``. The choice:

- ``none``: no tools reach the model, no grammar;
- ``required`` (Anthropic ``any``) and a named tool (``tool``): the whole
  output is constrained by `call_grammar`, built from the functions' JSON
  schemas (llama-cpp-python's ``json_schema_to_gbnf``), so the arguments
  always parse and validate against them;
- ``auto``: the model writes freely while the server watches for the family's
  markers (`erllama_py.server.chat_run`); once one is seen, generation
  continues from exactly that state (the cache restores it) under
  `continuation_grammar`, which is the call's grammar after the marker.

``parallel_tool_calls`` lets the grammar repeat the call block. The output is
then parsed back by `parse_calls` (whatever the family: it reads the call
objects in the text); every id is minted here.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from llama_cpp.llama_grammar import json_schema_to_gbnf

from erllama_py.errors import InvalidRequestError
from erllama_py.model.jinja_chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from erllama_py.params import Tool
from erllama_py.server.tool_syntax import GENERIC, ToolSyntax

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ParsedCall",
    "ToolChoice",
    "ToolDef",
    "call_grammar",
    "continuation_grammar",
    "mint_id",
    "parse_calls",
]

_ROOT = re.compile(r"^root ::=", re.MULTILINE)


@dataclass(frozen=True)
class ToolDef:
    """A function offered to the model."""

    name: str
    description: str | None
    parameters: dict[str, object]

    def as_tool(self) -> Tool:
        """OpenAI's shape, which chat templates render."""
        function: dict[str, object] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}  # type: ignore[typeddict-item]


@dataclass(frozen=True)
class ToolChoice:
    """How the model may use the tools: ``kind`` and, for ``named``, the tool's name."""

    kind: Literal["none", "auto", "required", "named"]
    name: str | None = None
    parallel: bool = True

    def offered(self, tools: list[ToolDef]) -> list[ToolDef]:
        """The tools the grammar allows (all, or the named one: a 400 if it is not listed)."""
        if self.kind != "named":
            return tools
        chosen = [t for t in tools if t.name == self.name]
        if not chosen:
            raise InvalidRequestError(
                f"tool_choice names {self.name!r}, which is not in tools", param="tool_choice"
            )
        return chosen


@dataclass(frozen=True)
class ParsedCall:
    """A call the model made: its id, the function's name, its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def input(self) -> dict[str, object]:
        parsed = json.loads(self.arguments)
        return parsed if isinstance(parsed, dict) else {}


def mint_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def _rewrite_refs(node: object, prefix: str) -> object:
    """``node`` with its local ``$ref``s pointing at the definitions lifted under ``prefix``."""
    if isinstance(node, dict):
        out = {k: _rewrite_refs(v, prefix) for k, v in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str):
            for local in ("#/$defs/", "#/definitions/"):
                if ref.startswith(local):
                    out["$ref"] = f"#/$defs/{prefix}{ref[len(local) :]}"
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


def _schema(tool: ToolDef, index: int, defs: dict[str, object], args_key: str) -> dict[str, object]:
    """The call's schema; the parameters' own definitions move to the root (into ``defs``,
    renamed per tool) so that their ``$ref``s still resolve once the schema is nested."""
    parameters = dict(tool.parameters or {"type": "object"})
    prefix = f"t{index}-"
    for key in ("$defs", "definitions"):
        lifted = parameters.pop(key, None)
        if isinstance(lifted, dict):
            for name, definition in lifted.items():
                defs[prefix + name] = _rewrite_refs(definition, prefix)
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            args_key: _rewrite_refs(parameters, prefix),
        },
        "required": ["name", args_key],
    }


def _call_rules(tools: list[ToolDef], args_key: str) -> str:
    """GBNF whose ``tool-call-json`` rule is one call of one of ``tools``."""
    if not tools:
        raise InvalidRequestError("tool_choice needs at least one tool", param="tools")
    defs: dict[str, object] = {}
    schemas = [_schema(t, i, defs, args_key) for i, t in enumerate(tools)]
    schema: dict[str, object] = schemas[0] if len(schemas) == 1 else {"oneOf": schemas}
    if defs:
        schema = {**schema, "$defs": defs}
    try:
        rules = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # whatever the converter raises, the schema is the client's
        raise InvalidRequestError(
            f"a tool's parameters cannot be compiled to a grammar: {exc}", param="tools"
        ) from None
    if not _ROOT.search(rules):
        raise InvalidRequestError("a tool's parameters compiled to no grammar", param="tools")
    return _ROOT.sub("tool-call-json ::=", rules)


def _blocks(choice: ToolChoice, syntax: ToolSyntax) -> str:
    """``tool-calls``: one call, or several when parallel, in ``syntax``."""
    if syntax.wrapped:
        block = f'"{syntax.open}" "\\n"? tool-call-json "\\n"? "{syntax.close}"'
        more = ' ("\\n" tool-call-block)*' if choice.parallel else ""
        return f"tool-call-block ::= {block}\ntool-calls ::= tool-call-block{more}\n"
    if syntax.listed:
        more = ' ("," " "? tool-call-json)*' if choice.parallel else ""
        return f'tool-calls ::= "[" tool-call-json{more} "]"\n'
    more = ' ("\\n" tool-call-json)*' if choice.parallel else ""
    return f"tool-calls ::= tool-call-json{more}\n"


def call_grammar(tools: list[ToolDef], choice: ToolChoice, syntax: ToolSyntax = GENERIC) -> str:
    """The grammar of a whole output that is only tool calls (``required``, named): in
    ``syntax``, but without a marker that is a control token (a grammar matches text)."""
    rules = _call_rules(choice.offered(tools), syntax.args_key)
    return f"root ::= tool-calls\n{_blocks(choice, syntax)}{rules}"


def continuation_grammar(
    tools: list[ToolDef], choice: ToolChoice, syntax: ToolSyntax = GENERIC
) -> str:
    """The grammar of what follows the marker the model wrote (``auto``): for a wrapped
    syntax the rest of the block (its opening was the marker), else the calls."""
    rules = _call_rules(choice.offered(tools), syntax.args_key)
    if not syntax.wrapped:
        return f"root ::= tool-calls\n{_blocks(choice, syntax)}{rules}"
    more = ' ("\\n" tool-call-block)*' if choice.parallel else ""
    first = f'"\\n"? tool-call-json "\\n"? "{syntax.close}"'
    return f"root ::= {first}{more}\n{_blocks(choice, syntax)}{rules}"


def _values(text: str) -> list[object]:
    """Every JSON object or list in ``text``, in order, none inside another."""
    decoder = json.JSONDecoder()
    out: list[object] = []
    i = 0
    while True:
        starts = [j for j in (text.find("{", i), text.find("[", i)) if j >= 0]
        if not starts:
            return out
        j = min(starts)
        try:
            value, end = decoder.raw_decode(text, j)
        except ValueError:
            i = j + 1
            continue
        out.append(value)
        i = end


def parse_calls(text: str, tools: list[ToolDef], prefix: str) -> list[ParsedCall]:
    """The complete calls in ``text``, in any family's syntax (JSON objects naming an
    offered tool, alone or in a list), each with a fresh id; arguments re-serialized."""
    names = {t.name for t in tools}
    calls = []
    for value in _values(text):
        for call in value if isinstance(value, list) else [value]:
            if not isinstance(call, dict) or call.get("name") not in names:
                continue
            arguments = call.get("arguments", call.get("parameters", {}))
            if isinstance(arguments, str):  # some models write the arguments as a JSON string
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    continue
            calls.append(ParsedCall(mint_id(prefix), str(call["name"]), json.dumps(arguments)))
    return calls
