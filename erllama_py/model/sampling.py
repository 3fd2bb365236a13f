"""The position-keyed seed of a sampled draw.

Exact stop-and-resume needs the random draw of the token at absolute
position ``p`` to depend only on ``(seed, p)`` and the distribution, never on
how many draws a sampler object made before: a resumed request gets a new
sampler. :func:`draw_seed` derives the 32-bit seed of the draw at ``p`` with
splitmix64; the llama backend re-creates its ``dist`` sampler with it before
every draw.
"""

from __future__ import annotations

__all__ = [
    "LLAMA_DEFAULT_SEED",
    "draw_seed",
    "splitmix64",
]

_MASK64 = (1 << 64) - 1
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
"""``llama_sampler_init_dist`` treats this seed as "pick a random seed"."""


def splitmix64(x: int) -> int:
    """One splitmix64 step: a well-mixed 64-bit function of a 64-bit input."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, pos: int) -> int:
    """The 32-bit seed of the draw for the token at absolute position ``pos``.

    Never returns ``0xFFFFFFFF``, which llama.cpp would replace by a random seed.
    """
    s = splitmix64(splitmix64(seed & _MASK64) ^ (pos & _MASK64)) & 0xFFFFFFFF
    return s - 1 if s == LLAMA_DEFAULT_SEED else s
