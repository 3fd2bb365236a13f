"""The free sequence ids of one context, lowest first.

Without a unified KV cache llama.cpp puts sequences in one ubatch (one pass
over the model's weights) only while their ids are consecutive in the batch
(see ``LlamaBackend.step``). Handing out the lowest free id keeps the ids in
use packed at the bottom, so the sequences decoding together are one run.
"""

from __future__ import annotations

import bisect

__all__ = ["SeqPool"]


class SeqPool:
    """Free seq ids in ``[0, n)``; :meth:`take` returns the lowest."""

    def __init__(self, n: int = 0) -> None:
        self._free = list(range(n))

    def __bool__(self) -> bool:
        return bool(self._free)

    def __len__(self) -> int:
        return len(self._free)

    def __contains__(self, seq: object) -> bool:
        return seq in self._free

    def lowest(self) -> int | None:
        """The id :meth:`take` would return, or None."""
        return self._free[0] if self._free else None

    def take(self) -> int:
        """The lowest free id (IndexError when none is free)."""
        return self._free.pop(0)

    def give(self, seq: int) -> None:
        """Free `seq` again; freeing a free id does nothing."""
        i = bisect.bisect_left(self._free, seq)
        if i == len(self._free) or self._free[i] != seq:
            self._free.insert(i, seq)
