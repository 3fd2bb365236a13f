"""How a model family writes a tool call: the markers that start one, and the call's shape.

Chosen from the chat template in use (`syntax_for`):

========  ========================================  ==========================================
family    starts a call                              the call
========  ========================================  ==========================================
generic   ``<tool_call>`` (the generic tool prompt)  ``<tool_call>{"name", "arguments"}``...
hermes    ``<tool_call>`` (Qwen, Hermes)             the same
llama3    ``<|python_tag|>``, or a reply that opens  ``{"name": ..., "parameters": {...}}``
          with a bare ``{"name"``
mistral   ``[TOOL_CALLS]``                           ``[{"name", "arguments"}, ...]``
========  ========================================  ==========================================

A template without tool support gets the tools through the generic prompt, so
its family is ``generic`` whatever model it is. A marker may be text or a
control token of the vocabulary (which renders as no text): which one is
decided per model from its vocabulary (`erllama_py.server.chat_run`). A
``at_start`` marker counts only as the reply's first non-blank text
(`StartWatch`): a brace later in a reply is just text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erllama_py.model.jinja_chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, supports_tools

__all__ = [
    "GENERIC",
    "HERMES",
    "LLAMA3",
    "MISTRAL",
    "SYNTAXES",
    "Marker",
    "StartWatch",
    "ToolSyntax",
    "syntax_for",
]

Family = Literal["generic", "hermes", "llama3", "mistral"]


@dataclass(frozen=True)
class Marker:
    """Text (or a control token's text) that starts a tool call."""

    text: str
    at_start: bool = False  # only as the reply's first non-blank text, blanks inside ignored


@dataclass(frozen=True)
class ToolSyntax:
    """A family's calls: its markers, what wraps each call, the arguments' key."""

    family: Family
    markers: tuple[Marker, ...]
    open: str = ""  # written before each call (block-wrapped families)
    close: str = ""  # written after each call
    args_key: Literal["arguments", "parameters"] = "arguments"
    listed: bool = False  # the calls are one JSON list (Mistral)
    anywhere: tuple[str, ...] = field(init=False)
    start: Marker | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "anywhere", tuple(m.text for m in self.markers if not m.at_start))
        starts = [m for m in self.markers if m.at_start]
        object.__setattr__(self, "start", starts[0] if starts else None)

    @property
    def wrapped(self) -> bool:
        return bool(self.open and self.close)


GENERIC = ToolSyntax("generic", (Marker(TOOL_CALL_OPEN),), TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
HERMES = ToolSyntax("hermes", (Marker(TOOL_CALL_OPEN),), TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
LLAMA3 = ToolSyntax(
    "llama3",
    (Marker("<|python_tag|>"), Marker('{"name"', at_start=True)),
    args_key="parameters",
)
MISTRAL = ToolSyntax("mistral", (Marker("[TOOL_CALLS]"),), listed=True)
SYNTAXES: dict[Family, ToolSyntax] = {s.family: s for s in (GENERIC, HERMES, LLAMA3, MISTRAL)}


def syntax_for(template: str | None) -> ToolSyntax:
    """The syntax of the calls a model using ``template`` writes (generic by default)."""
    if template is None or not supports_tools(template):
        return GENERIC
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or (
        "<|start_header_id|>" in template and '"parameters"' in template
    ):
        return LLAMA3
    if TOOL_CALL_OPEN in template:
        return HERMES
    return GENERIC


StartState = Literal["undecided", "text", "call"]


class StartWatch:
    """Whether a reply, fed piece by piece, opens with ``marker`` (blanks ignored)."""

    def __init__(self, marker: Marker) -> None:
        self._marker = "".join(marker.text.split())
        self.text = ""  # everything fed
        self.state: StartState = "undecided"

    def feed(self, piece: str) -> StartState:
        if self.state != "undecided":
            return self.state
        self.text += piece
        squeezed = "".join(self.text.split())[: len(self._marker)]
        if squeezed == self._marker:
            self.state = "call"
        elif not self._marker.startswith(squeezed):
            self.state = "text"
        return self.state

    @property
    def lead(self) -> str:
        """The blanks before the marker."""
        return self.text[: len(self.text) - len(self.text.lstrip())]
