"""The shared preamble of a chat: where a state worth saving for other conversations ends.

Agents resend one system prompt (and tool definitions) with every turn of
every conversation, while their histories differ. A row saved only at the end
of each prompt is a prefix of that conversation's next turn, never of another
conversation's prompt, so a second agent would prefill the whole preamble
again. A chat whose first message is a system message therefore also saves
its state where its leading system messages end: the longest token prefix
that a rendering of those messages shares with the whole prompt (templates
differ in what follows the system text; the common prefix is a valid save
point whatever they render there). Two renderings are tried: the system
messages alone, and followed by an empty user turn, because templates without
a system role (Gemma's, Mistral's) fold the system text into the first user
turn and render nothing of it alone.

The tokens of a preamble are computed once per (template, messages, tools)
and kept in a small LRU, since the same preamble comes back every turn.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence

from erllama_py.params import ChatMessage, Tool

__all__ = ["PreambleCache", "leading_system", "shared_prefix_len"]

Render = Callable[[Sequence[ChatMessage]], list[int]]
PROBE: ChatMessage = {"role": "user", "content": ""}  # the turn a system text may be folded into


def leading_system(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The system messages a conversation opens with, when more messages follow them."""
    n = 0
    while n < len(messages) and messages[n].get("role") == "system":
        n += 1
    return list(messages[:n]) if 0 < n < len(messages) else []


def shared_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PreambleCache:
    """Preamble tokens by (template, leading system messages, tools), least recent out."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._tokens: OrderedDict[str, tuple[list[int], ...]] = OrderedDict()

    def save_point(
        self,
        messages: Sequence[ChatMessage],
        template: str | None,
        tools: Sequence[Tool] | None,
        prompt: Sequence[int],
        render: Render,
    ) -> int | None:
        """Where the preamble of `messages` ends in `prompt` (tokens), or None when the
        chat has no leading system messages or the preamble shares nothing with it.

        `render` tokenizes a rendering of the given messages (with `template` and
        `tools`); an empty list (a template that cannot render them) is remembered
        like any other, so it is not rendered again.
        """
        leading = leading_system(messages)
        if not leading:
            return None
        key = json.dumps([template, leading, list(tools or ())], sort_keys=True, default=str)
        renderings = self._tokens.get(key)
        if renderings is None:
            renderings = (render(leading), render([*leading, PROBE]))
            self._tokens[key] = renderings
            while len(self._tokens) > self.capacity:
                self._tokens.popitem(last=False)
        else:
            self._tokens.move_to_end(key)
        n = max(shared_prefix_len(tokens, prompt) for tokens in renderings)
        return n if 0 < n < len(prompt) else None
