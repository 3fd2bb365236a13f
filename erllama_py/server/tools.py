"""Tool calls, shared by both API families: the calls' grammar, their parsing, the choice.

A tool call is written ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(`TOOL_CALL_OPEN`, the marker): Qwen's and Hermes' format, and the one the
generic tool prompt asks for (`erllama_py.model.jinja_chat`). The choice:

- ``none``: no tools reach the model, no grammar;
- ``required`` (Anthropic ``any``) and a named tool (``tool``): the whole
  output is constrained by `call_grammar`, built from the functions' JSON
  schemas (llama-cpp-python's ``json_schema_to_gbnf``), so the arguments
  always parse and validate against them;
- ``auto``: the model writes freely, with the marker as a stop sequence; if
  it stops on the marker, generation continues from exactly that state (the
  cache restores it) under `continuation_grammar`, which is the call's
  grammar after the marker.

``parallel_tool_calls`` lets the grammar repeat the call block. The output is
then parsed back by `parse_calls`; every id is minted here.
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
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.S)


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


def _schema(tool: ToolDef, index: int, defs: dict[str, object]) -> dict[str, object]:
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
            "arguments": _rewrite_refs(parameters, prefix),
        },
        "required": ["name", "arguments"],
    }


def _call_rules(tools: list[ToolDef]) -> str:
    """GBNF whose ``tool-call-json`` rule is one call of one of ``tools``."""
    if not tools:
        raise InvalidRequestError("tool_choice needs at least one tool", param="tools")
    defs: dict[str, object] = {}
    schemas = [_schema(t, i, defs) for i, t in enumerate(tools)]
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


def _blocks(choice: ToolChoice) -> str:
    block = f'"{TOOL_CALL_OPEN}" "\\n"? tool-call-json "\\n"? "{TOOL_CALL_CLOSE}"'
    more = ' ("\\n" tool-call-block)*' if choice.parallel else ""
    return f"tool-call-block ::= {block}\ntool-calls ::= tool-call-block{more}\n"


def call_grammar(tools: list[ToolDef], choice: ToolChoice) -> str:
    """The grammar of a whole output that is only tool calls (``required``, named)."""
    rules = _call_rules(choice.offered(tools))
    return f"root ::= tool-calls\n{_blocks(choice)}{rules}"


def continuation_grammar(tools: list[ToolDef], choice: ToolChoice) -> str:
    """The grammar of what follows the marker the model wrote (``auto``)."""
    rules = _call_rules(choice.offered(tools))
    more = ' ("\\n" tool-call-block)*' if choice.parallel else ""
    first = f'"\\n"? tool-call-json "\\n"? "{TOOL_CALL_CLOSE}"'
    return f"root ::= {first}{more}\n{_blocks(choice)}{rules}"


def parse_calls(text: str, tools: list[ToolDef], prefix: str) -> list[ParsedCall]:
    """The complete calls in ``text`` (``<tool_call>...</tool_call>`` blocks whose JSON names
    an offered tool), each with a fresh id; arguments re-serialized compactly."""
    names = {t.name for t in tools}
    calls = []
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
        except ValueError:
            continue
        if not isinstance(call, dict) or call.get("name") not in names:
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                continue
        calls.append(ParsedCall(mint_id(prefix), str(call["name"]), json.dumps(arguments)))
    return calls
