"""Tool calls read as they are generated: each call's name as soon as it is written, then
its arguments' JSON in fragments, as the grammar-constrained text arrives.

`CallScanner` is fed the text after a call marker (or a whole forced output),
piece by piece, in any family's syntax: it looks for each call object
(``{"name": "...", "arguments"|"parameters": ...}``, the order the grammar
writes), reports `CallHead` once the name is complete, `CallArgs` for each
piece of the arguments' value, and `CallEnd` when that value is closed.
Whatever it cannot follow (a shape the grammar does not write) stops it; the
caller then parses the finished text as a whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["CallArgs", "CallEnd", "CallHead", "CallScanner", "ScanEvent"]

_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
MAX_HEAD_CHARS = 1024  # a call object whose head is not complete by then is not followed


@dataclass(frozen=True)
class CallHead:
    index: int
    name: str


@dataclass(frozen=True)
class CallArgs:
    index: int
    text: str


@dataclass(frozen=True)
class CallEnd:
    index: int


ScanEvent = CallHead | CallArgs | CallEnd


class CallScanner:
    """Follows the calls in a growing text (see the module docstring)."""

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0  # where scanning resumes
        self._state: str = "seek"  # seek | head | args | tail
        self._start = 0  # the current call object's "{"
        self._index = -1
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._began = False  # the arguments' value has started
        self.failed = False

    @property
    def calls(self) -> int:
        """How many calls have started."""
        return self._index + 1

    def feed(self, piece: str) -> list[ScanEvent]:
        self._text += piece
        out: list[ScanEvent] = []
        while not self.failed and self._step(out):
            pass
        return out

    def _step(self, out: list[ScanEvent]) -> bool:
        """One move of the state machine; False when it needs more text."""
        text = self._text
        if self._state == "seek":
            brace = text.find("{", self._pos)
            if brace < 0:
                self._pos = len(text)
                return False
            self._start, self._pos, self._state = brace, brace, "head"
            return True
        if self._state == "head":
            match = _HEAD.match(text, self._start)
            if match is None:
                if len(text) - self._start > MAX_HEAD_CHARS:
                    self.failed = True
                return False
            self._index += 1
            out.append(CallHead(self._index, json.loads(match.group(1))))
            self._pos, self._state = match.end(), "args"
            self._depth, self._in_string, self._escape, self._began = 0, False, False, False
            return True
        if self._state == "args":
            return self._args(out)
        close = text.find("}", self._pos)  # tail: the call object's own "}"
        if close < 0:
            return False
        self._pos, self._state = close + 1, "seek"
        return True

    def _args(self, out: list[ScanEvent]) -> bool:
        text = self._text
        begin = self._pos
        i = begin
        ended = False
        while i < len(text):
            c = text[i]
            if not self._began:
                if c.isspace():
                    i += 1
                    begin = i  # blanks before the value are not part of it
                    continue
                if c not in "{[":
                    self.failed = True  # not an object: left to the whole-text parse
                    return False
                self._began = True
            i += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    ended = True
                    break
        fragment = text[begin:i]
        if fragment:
            out.append(CallArgs(self._index, fragment))
        self._pos = i
        if ended:
            out.append(CallEnd(self._index))
            self._state = "tail"
            return True
        return False
