"""Cache affinity without Ray: the prefix key of a request and the routing decision.

The key of a request is a chain of block hashes of its rendered prompt: the model
name, then for a chat each message as ``role``, a separator and its text, for a
completion the prompt (text, or token ids). Block ``i``'s hash covers every byte
before its end, so two requests share their first ``k`` hashes exactly when their
first ``k`` blocks are equal: a conversation that resends its history shares every
full block of the earlier turn. Only full blocks count (a trailing partial block
grows with the next turn, so it never matches anything).

`choose_target` is the policy, a pure function the Ray router calls: the replica
that was sent the longest matching prefix, else the rendezvous (highest random
weight) replica of the first block, so that several routers (one per ingress
replica) agree on a new conversation without sharing state; unless the chosen
replica's queue is longer than the shortest by more than the threshold, then the
least-loaded replica.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import xxhash

__all__ = ["AffinityMap", "Choice", "affinity_key", "choose_target", "prompt_bytes"]

_ROLE_SEP = b"\x1f"
_MESSAGE_SEP = b"\x1e"


def _text_of(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text_of(part) for part in content)
    if isinstance(content, Mapping):
        text = content.get("text")
        if isinstance(text, str):
            return text
        return _text_of(content.get("content"))
    return ""


def prompt_bytes(body: Mapping[str, object]) -> bytes:
    """The bytes of a request's prompt as the affinity key sees it (model name first)."""
    out = [str(body.get("model", "")).encode(), _MESSAGE_SEP]
    messages = body.get("messages")
    if isinstance(messages, list):
        system = body.get("system")  # Anthropic's Messages API keeps it apart
        if system is not None:
            out += [b"system", _ROLE_SEP, _text_of(system).encode(), _MESSAGE_SEP]
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            out += [str(message.get("role", "")).encode(), _ROLE_SEP]
            out.append(_text_of(message.get("content")).encode())
            calls = message.get("tool_calls")
            if calls:
                out.append(json.dumps(calls, sort_keys=True).encode())
            out.append(_MESSAGE_SEP)
        return b"".join(out)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch: the first prompt steers
    if isinstance(prompt, str):
        out.append(prompt.encode())
    elif isinstance(prompt, list):
        out.append(b",".join(str(t).encode() for t in prompt))
    return b"".join(out)


def affinity_key(data: bytes, block_chars: int, max_blocks: int) -> tuple[str, ...]:
    """The chained hashes of the first full blocks of `data` (hex, shortest prefix first)."""
    hashes: list[str] = []
    state = xxhash.xxh3_64()
    for start in range(0, min(len(data), block_chars * max_blocks), block_chars):
        block = data[start : start + block_chars]
        if len(block) < block_chars:
            break
        state.update(block)
        hashes.append(state.hexdigest())
    return tuple(hashes)


class AffinityMap:
    """Which replica each prefix hash was last sent to (least recently used dropped first)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._where: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._where)

    def longest(self, key: Sequence[str], replicas: Sequence[str]) -> tuple[str, int] | None:
        """The replica holding the longest prefix of `key` among `replicas`, and its depth."""
        live = set(replicas)
        for depth in range(len(key), 0, -1):
            replica = self._where.get(key[depth - 1])
            if replica is not None and replica in live:
                return replica, depth
        return None

    def record(self, key: Sequence[str], replica: str) -> None:
        for h in key:
            self._where[h] = replica
            self._where.move_to_end(h)
        while len(self._where) > self.max_entries:
            self._where.popitem(last=False)

    def forget(self, replica: str) -> None:
        """Drop a dead replica's entries (its restart has a new id)."""
        for h in [h for h, r in self._where.items() if r == replica]:
            del self._where[h]


@dataclass(frozen=True)
class Choice:
    """A routing decision: the replica, and why (``prefix``, ``rendezvous``, ``load``)."""

    replica: str
    reason: str
    depth: int = 0


def _rendezvous(first_block: str, replicas: Sequence[str]) -> str:
    return max(replicas, key=lambda r: xxhash.xxh3_64_intdigest(f"{first_block}/{r}".encode()))


def choose_target(
    key: Sequence[str],
    where: AffinityMap,
    queue_lens: Mapping[str, int],
    imbalance_threshold: int,
) -> Choice:
    """The replica for a request with prefix `key`, given each live replica's queue length.

    Raises:
        ValueError: no replica is live (`queue_lens` is empty).
    """
    replicas = sorted(queue_lens)
    if not replicas:
        raise ValueError("no live replica to choose from")
    least = min(replicas, key=lambda r: (queue_lens[r], r))
    if not key:
        return Choice(least, "load")
    found = where.longest(key, replicas)
    choice = (
        Choice(found[0], "prefix", found[1])
        if found is not None
        else Choice(_rendezvous(key[0], replicas), "rendezvous")
    )
    if queue_lens[choice.replica] - queue_lens[least] > imbalance_threshold:
        return Choice(least, "load")
    return choice
