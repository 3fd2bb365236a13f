"""A radix tree over the token lists of one namespace's rows.

It finds, in time linear in the prompt, the rows worth restoring for a
prompt, at any length (the stride walk of the original only sees
stride-aligned lengths):

- *covered*: the longest row whose whole token list is a prefix of the
  prompt; restoring it needs no cut;
- *common*: the shortest row among those sharing the longest common prefix
  ``L`` with the prompt; restoring it and cutting the state back to ``L``
  tokens is still token-exact, and gives at least as many tokens as covered.

Edges are labelled with u32-LE token bytes, so matching an edge is one
``memcmp`` (``bytes.startswith``), and the first mismatch inside a long edge is
found by comparing 4 KiB chunks and then bisecting, never token by token.
Each node keeps the shortest row of its subtree (``best``), maintained on
insert and remove; removal merges nodes back, so every node but the root has
a row or at least two children.

Not thread-safe: the owner (the meta actor) mutates it, and readers must not
read concurrently with a mutation.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import NamedTuple

from erllama_py.cache.key import BytesLike

__all__ = ["RowRef", "Candidate", "PrefixMatch", "TokenTrie"]

_CHUNK = 4096  # bytes compared at once before bisecting a mismatch


class RowRef(NamedTuple):
    """A stored row: its key and its length in tokens."""

    key: bytes
    n_tokens: int


class Candidate(NamedTuple):
    """A row that can serve a prompt: restore it, cut to ``usable`` tokens."""

    key: bytes
    n_tokens: int
    usable: int
    """The common prefix of the row and the prompt, in tokens."""


class PrefixMatch(NamedTuple):
    """The answer of :meth:`TokenTrie.longest_prefix`.

    Invariant: ``covered.n_tokens <= common_len <= common.n_tokens``.
    """

    covered: RowRef | None
    """The longest row that is a whole prefix of the prompt (the empty row counts)."""
    common: RowRef | None
    """The shortest row sharing ``common_len`` tokens with the prompt; None if 0."""
    common_len: int
    """The longest common prefix of the prompt and any row, in tokens."""


class _Node:
    __slots__ = ("best", "children", "end", "label", "parent", "row")

    def __init__(self, label: bytes, parent: _Node | None, end: int) -> None:
        self.label = label  # edge from the parent; b"" only at the root
        self.parent = parent
        self.children: dict[bytes, _Node] = {}  # first token (4 bytes) of the label -> child
        self.row: bytes | None = None  # key of the row whose tokens end here
        self.end = end  # byte depth at the end of the label
        # Invariant: best is the minimal (n_tokens, key) of the rows in this subtree.
        self.best: tuple[int, bytes] | None = None


def _as_token_bytes(data: BytesLike) -> bytes:
    tokens = data if isinstance(data, bytes) else bytes(data)
    if len(tokens) % 4:
        raise ValueError(f"token bytes must be a multiple of 4 bytes, got {len(tokens)}")
    return tokens


def _match_len(text: bytes, pos: int, label: bytes) -> int:
    """Bytes of ``label`` matching ``text`` from ``pos``, rounded down to whole tokens."""
    limit = min(len(label), len(text) - pos)
    view = memoryview(label)
    lo = 0
    while lo + _CHUNK <= limit and text.startswith(view[lo : lo + _CHUNK], pos + lo):
        lo += _CHUNK
    hi = min(lo + _CHUNK, limit)
    while lo < hi:  # [0, lo) matches; the answer is <= hi
        mid = (lo + hi + 1) // 2
        if text.startswith(view[lo:mid], pos + lo):
            lo = mid
        else:
            hi = mid - 1
    return lo & ~3


def _subtree_best(node: _Node) -> tuple[int, bytes] | None:
    best = (node.end // 4, node.row) if node.row is not None else None
    for child in node.children.values():
        if child.best is not None and (best is None or child.best < best):
            best = child.best
    return best


class TokenTrie:
    """Token lists of one namespace's rows, for longest-prefix lookups.

    One key per token list; lists may be prefixes of one another. Token
    lists are u32-LE bytes (:func:`~erllama_py.cache.key.encode_tokens`).
    Lookups cost O(prompt length) byte comparisons plus O(1) per node on the
    path; insert likewise; remove may also scan the children of the nodes
    whose shortest row it was.
    """

    def __init__(self) -> None:
        self._root = _Node(b"", None, 0)
        self._by_key: dict[bytes, _Node] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, row_key: object) -> bool:
        """Whether a row with this key is stored."""
        return row_key in self._by_key

    def clear(self) -> None:
        """Remove every row."""
        self._root = _Node(b"", None, 0)
        self._by_key.clear()

    # ------------------------------------------------------------ queries

    def _walk_exact(self, tokens: bytes) -> _Node | None:
        node, pos = self._root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos : pos + 4])
            if child is None or not tokens.startswith(child.label, pos):
                return None
            node, pos = child, pos + len(child.label)
        return node if pos == len(tokens) else None

    def find(self, token_bytes: BytesLike) -> bytes | None:
        """Return the key of the row with exactly these tokens, or None.

        Raises:
            ValueError: ``token_bytes`` is not a multiple of 4 bytes.
        """
        node = self._walk_exact(_as_token_bytes(token_bytes))
        return None if node is None else node.row

    def tokens_of(self, row_key: bytes) -> bytes | None:
        """Return the token bytes of the row with this key, or None."""
        node = self._by_key.get(row_key)
        if node is None:
            return None
        labels = []
        while node is not None:
            labels.append(node.label)
            node = node.parent
        return b"".join(reversed(labels))

    def keys(self) -> Iterator[bytes]:
        """Yield every stored row's key, in no particular order."""
        return iter(self._by_key)

    def rows(self) -> Iterator[RowRef]:
        """Yield every stored row, in no particular order."""
        for key, node in self._by_key.items():
            yield RowRef(key, node.end // 4)

    def _descend(self, prompt: bytes) -> tuple[list[_Node], _Node | None, int]:
        """Follow the prompt: (fully matched nodes from the root, partly matched child, bytes)."""
        path = [self._root]
        node, pos = self._root, 0
        while pos < len(prompt):
            child = node.children.get(prompt[pos : pos + 4])
            if child is None:
                break
            if prompt.startswith(child.label, pos):
                node, pos = child, pos + len(child.label)
                path.append(node)
                continue
            return path, child, pos + _match_len(prompt, pos, child.label)
        return path, None, pos

    def longest_prefix(self, prompt_bytes: BytesLike) -> PrefixMatch | None:
        """Return the covered and the common row for a prompt (see :class:`PrefixMatch`).

        Returns None when no row shares a token with the prompt and there is
        no empty row. Ties between equally short rows go to the smaller key.

        Raises:
            ValueError: ``prompt_bytes`` is not a multiple of 4 bytes.
        """
        path, partial, pos = self._descend(_as_token_bytes(prompt_bytes))
        covered = None
        for node in reversed(path):
            if node.row is not None:
                covered = RowRef(node.row, node.end // 4)
                break
        below = partial if partial is not None else path[-1]
        common = None
        if pos > 0 and below.best is not None:
            common = RowRef(below.best[1], below.best[0])
        if covered is None and common is None:
            return None
        return PrefixMatch(covered, common, pos // 4)

    def candidates(
        self, prompt_bytes: BytesLike, limit: int, min_tokens: int = 1
    ) -> list[Candidate]:
        """Return up to ``limit`` rows that can serve the prompt, best first.

        Every row sharing at least ``min_tokens`` tokens with the prompt
        qualifies; they are ordered by usable tokens (descending), then
        length (ascending: less to load and cut), then key. The first is
        :attr:`PrefixMatch.common`; the covered rows (on the prompt's path)
        come where their length puts them. For a model that must try another
        row when one fails to load.

        Raises:
            ValueError: ``prompt_bytes`` is not a multiple of 4 bytes, or
                ``limit < 0``.
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        path, partial, pos = self._descend(_as_token_bytes(prompt_bytes))
        out: list[Candidate] = []
        if partial is not None and pos // 4 >= min_tokens:
            self._collect(pos // 4, None, [partial], limit, out)
        skip = partial
        for node in reversed(path):
            usable = node.end // 4
            if len(out) >= limit or usable < min_tokens:
                break
            subtrees = [c for c in node.children.values() if c is not skip]
            self._collect(usable, node, subtrees, limit, out)
            skip = node
        return out

    @staticmethod
    def _collect(
        usable: int, own: _Node | None, subtrees: list[_Node], limit: int, out: list[Candidate]
    ) -> None:
        """Append the row at ``own`` and the rows of ``subtrees``, shortest first."""
        heap: list[tuple[int, bytes, int, int, _Node]] = []
        counter = 0
        if own is not None and own.row is not None:
            heap.append((own.end // 4, own.row, 0, counter, own))
        for sub in subtrees:
            if sub.best is not None:
                counter += 1
                heap.append((sub.best[0], sub.best[1], 1, counter, sub))
        heapq.heapify(heap)
        while heap and len(out) < limit:
            n_tokens, key, is_subtree, _, node = heapq.heappop(heap)
            if not is_subtree:
                out.append(Candidate(key, n_tokens, usable))
                continue
            if node.row is not None:
                counter += 1
                heapq.heappush(heap, (node.end // 4, node.row, 0, counter, node))
            for child in node.children.values():
                if child.best is not None:
                    counter += 1
                    heapq.heappush(heap, (child.best[0], child.best[1], 1, counter, child))

    # ------------------------------------------------------------ mutation

    def insert(self, token_bytes: BytesLike, row_key: bytes) -> bool:
        """Store a row; return False if this exact row was already stored.

        Raises:
            ValueError: the token list is stored under another key, the key
                is stored with another token list, or the tokens are not a
                multiple of 4 bytes. Nothing changes then.
        """
        tokens = _as_token_bytes(token_bytes)
        held = self._by_key.get(row_key)
        if held is not None:
            if self._walk_exact(tokens) is held:
                return False
            raise ValueError(f"key {row_key.hex()} is already stored with other tokens")
        existing = self.find(tokens)
        if existing is not None:
            raise ValueError(f"these tokens are already stored under key {existing.hex()}")
        node = self._make_path(tokens)
        node.row = row_key
        self._by_key[row_key] = node
        entry = (len(tokens) // 4, row_key)
        up: _Node | None = node
        while up is not None and (up.best is None or entry < up.best):
            up.best = entry  # an ancestor already holding a smaller best keeps it
            up = up.parent
        return True

    def _make_path(self, tokens: bytes) -> _Node:
        """Return the node ending at ``tokens``, creating and splitting nodes."""
        node, pos = self._root, 0
        while pos < len(tokens):
            first = tokens[pos : pos + 4]
            child = node.children.get(first)
            if child is None:
                leaf = _Node(tokens[pos:], node, len(tokens))
                node.children[first] = leaf
                return leaf
            if tokens.startswith(child.label, pos):
                matched = len(child.label)
            else:
                matched = _match_len(tokens, pos, child.label)
                child = self._split(node, child, matched)
            node, pos = child, pos + matched
        return node

    @staticmethod
    def _split(parent: _Node, child: _Node, at: int) -> _Node:
        """Cut ``child``'s edge after ``at`` bytes; return the new middle node."""
        middle = _Node(child.label[:at], parent, parent.end + at)
        middle.best = child.best
        parent.children[middle.label[:4]] = middle
        child.label = child.label[at:]
        child.parent = middle
        middle.children[child.label[:4]] = child
        return middle

    def remove(self, token_bytes: BytesLike, row_key: bytes) -> bool:
        """Remove the row with these tokens and this key; idempotent.

        Returns False (and changes nothing) if no such row is stored.

        Raises:
            ValueError: ``token_bytes`` is not a multiple of 4 bytes.
        """
        node = self._by_key.get(row_key)
        if node is None or self._walk_exact(_as_token_bytes(token_bytes)) is not node:
            return False
        self._unlink(node)
        return True

    def remove_key(self, row_key: bytes) -> bool:
        """Remove the row with this key, whatever its tokens; idempotent."""
        node = self._by_key.get(row_key)
        if node is None:
            return False
        self._unlink(node)
        return True

    def _unlink(self, node: _Node) -> None:
        assert node.row is not None
        entry = (node.end // 4, node.row)
        del self._by_key[node.row]
        node.row = None
        start: _Node | None = node
        if node.parent is not None and len(node.children) == 1:
            start = self._merge_into_child(node)
        elif node.parent is not None and not node.children:
            parent = node.parent
            del parent.children[node.label[:4]]
            start = parent
            if parent.parent is not None and parent.row is None and len(parent.children) == 1:
                start = self._merge_into_child(parent)
        # Only nodes whose best was the removed row change; they form a path upwards.
        while start is not None and start.best == entry:
            start.best = _subtree_best(start)
            start = start.parent

    @staticmethod
    def _merge_into_child(node: _Node) -> _Node | None:
        """Replace a rowless node by its only child; return the node's parent."""
        (child,) = node.children.values()
        parent = node.parent
        assert parent is not None
        child.label = node.label + child.label
        child.parent = parent
        parent.children[node.label[:4]] = child
        return parent

    # ------------------------------------------------------------ checking

    def node_count(self) -> int:
        """The number of nodes, the root included (walks the whole tree)."""
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count

    def check(self) -> list[str]:
        """Return violations of the tree's invariants (empty when sound).

        For tests and post-mortems; walks the whole tree.
        """
        problems: list[str] = []
        seen: dict[bytes, _Node] = {}
        stack = [self._root]
        while stack:
            node = stack.pop()
            problems.extend(self._check_node(node))
            if node.row is not None:
                seen[node.row] = node
            stack.extend(node.children.values())
        if seen != self._by_key:
            problems.append("the key index differs from the rows in the tree")
        return problems

    def _check_node(self, node: _Node) -> list[str]:
        problems = []
        where = f"node at depth {node.end // 4}"
        if node is not self._root:
            assert node.parent is not None
            if not node.label or len(node.label) % 4:
                problems.append(f"{where}: label of {len(node.label)} bytes")
            if node.parent.children.get(node.label[:4]) is not node:
                problems.append(f"{where}: not filed under its first token in its parent")
            if node.end != node.parent.end + len(node.label):
                problems.append(f"{where}: depth does not add up")
            if node.row is None and len(node.children) < 2:
                problems.append(f"{where}: rowless node with {len(node.children)} children")
        for child in node.children.values():
            if child.parent is not node:
                problems.append(f"{where}: a child's parent pointer is wrong")
        if node.best != _subtree_best(node):
            problems.append(f"{where}: best {node.best} != {_subtree_best(node)}")
        return problems
