"""Turning generated token bytes into text deltas: UTF-8 safe, with stop sequences.

Token pieces are bytes, and a multi-byte character may be split across two
tokens; `TextStream` only emits whole characters. Stop sequences are matched
over the decoded text (spec 5.6.2): the leftmost match wins, the longest at
equal positions; only a tail that could be the start of a stop sequence is
held back, until it can no longer match, and the match itself is never emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StopMatch", "TextStream"]


@dataclass(frozen=True)
class StopMatch:
    """Where a stop sequence matched in the whole generated text."""

    stop: str
    position: int


class TextStream:
    """Accumulates token bytes; hands out text that is safe to show.

    Args:
        stops: stop sequences (empty strings are ignored).
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(sorted({s for s in stops if s}, key=len, reverse=True))
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""  # everything decoded so far
        self._emitted = 0  # characters of _text already handed out
        self.match: StopMatch | None = None

    @property
    def text(self) -> str:
        """The final text: everything decoded, cut before a matched stop sequence."""
        if self.match is not None:
            return self._text[: self.match.position]
        return self._text

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; return the new text that can be shown now ('' if none)."""
        if self.match is not None:
            return ""
        self._text += self._decoder.decode(piece)
        if self._stops:
            start = max(0, self._emitted - self._hold)
            found = self._find_stop(start)
            if found is not None:
                earlier = self._pending_before(found)
                if earlier is None:
                    self.match = found
                    out = self._text[self._emitted : found.position]
                    self._emitted = found.position
                    return out
                safe = earlier  # a stop that would win may still complete: hold from there
            else:
                safe = len(self._text) - self._partial_stop()
        else:
            safe = len(self._text)
        if safe <= self._emitted:
            return ""
        out = self._text[self._emitted : safe]
        self._emitted = safe
        return out

    def flush(self) -> str:
        """At the end: return whatever was held back (incomplete UTF-8 becomes U+FFFD)."""
        if self.match is None:
            self._text += self._decoder.decode(b"", final=True)
            if self._stops:  # nothing more can complete: the leftmost match found is final
                self.match = self._find_stop(max(0, self._emitted - self._hold))
        end = self.match.position if self.match is not None else len(self._text)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that is the start of a stop sequence."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _pending_before(self, found: StopMatch) -> int | None:
        """Where the text's tail starts a stop that would beat `found` once complete:
        one starting earlier, or at the same place and longer. None if there is none."""
        first = max(0, len(self._text) - self._hold)
        for start in range(first, found.position + 1):
            tail = self._text[start:]
            for stop in self._stops:
                beats = start < found.position or len(stop) > len(found.stop)
                if beats and len(stop) > len(tail) and stop.startswith(tail):
                    return start
        return None

    def _find_stop(self, start: int) -> StopMatch | None:
        best: StopMatch | None = None
        for stop in self._stops:  # longest first, so ties at a position keep the longest
            pos = self._text.find(stop, start)
            if pos != -1 and (best is None or pos < best.position):
                best = StopMatch(stop, pos)
        return best
