"""A llama.cpp vocabulary: tokenize, token pieces, detokenize."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Any

import llama_cpp as _L

from erllama_py.errors import InvalidRequestError

__all__ = ["Vocab"]


class Vocab:
    """Tokenizer of a loaded model; pieces are cached per token."""

    def __init__(self, vocab: Any) -> None:
        self.ptr = vocab
        self._pieces: dict[int, bytes] = {}
        self._pieces_special: dict[int, bytes] = {}

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text``; raises InvalidRequestError for non-text input."""
        if not isinstance(text, str):
            raise InvalidRequestError("text must be a str", param="text")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(f"text is not valid Unicode: {e}", param="text") from e
        cap = len(data) + 8
        for _ in range(2):
            arr = (_L.llama_token * cap)()
            n = int(
                _L.llama_tokenize(self.ptr, data, len(data), arr, cap, add_special, parse_special)
            )
            if n >= 0:
                return list(arr[:n])
            if n == -(2**31):
                break
            cap = -n
        raise InvalidRequestError("text is too long to tokenize", param="text")

    def piece(self, token: int, special: bool) -> bytes:
        """The bytes of one (valid) token."""
        cache = self._pieces_special if special else self._pieces
        p = cache.get(token)
        if p is None:
            buf = ctypes.create_string_buffer(64)
            n = int(_L.llama_token_to_piece(self.ptr, token, buf, 64, 0, special))
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = int(_L.llama_token_to_piece(self.ptr, token, buf, -n, 0, special))
            p = buf.raw[: max(n, 0)]
            cache[token] = p
        return p

    def detokenize(self, tokens: Iterable[int], special: bool) -> bytes:
        """Concatenated pieces of (valid) tokens."""
        return b"".join(self.piece(int(t), special) for t in tokens)
