"""The save policy: when a request's state is worth saving, as data and pure functions.

A model decides after each step whether to save (spec 4.11)::

    reason     when                                              gate
    cold       the trimmed, aligned prompt prefix is prefilled   cold_save_split
    continued  every continued_interval tokens of generation     should_continued_save
    finish     the request ends, for any reason                  should_finish_save
    evict      an explicit evict; the context is not empty       none
    shutdown   the model stops; the context is not empty         none

Cold saves are cut back by ``boundary_trim_tokens`` (the next turn
retokenises the last few tokens of a prompt) and down to a multiple of
``boundary_align_tokens``, the stride of the longest-prefix walk, so the walk
finds them. ``min_tokens`` is the floor of every gated save; ``None``
disables saving altogether (then no gate ever opens).

Everything here is pure: no I/O, no meta actor.
"""

from __future__ import annotations

from erllama_py.config import SavePolicy, validate_policy

__all__ = [
    "SavePolicy",
    "validate_policy",
    "trim_boundary",
    "cold_save_split",
    "should_continued_save",
    "should_finish_save",
]


def trim_boundary(n_tokens: int, trim: int, align: int) -> int | None:
    """Return the length of the trimmed, aligned prefix of ``n_tokens`` tokens.

    Drops ``trim`` tokens from the tail, then rounds down to a multiple of
    ``align``. Returns None (skip) when fewer than ``align`` tokens are left.
    Examples (trim 32, align 2048): 600 -> None, 2080 -> 2048, 4500 -> 4096.

    Raises:
        ValueError: ``n_tokens < 0``, ``trim < 0`` or ``align <= 0``.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if trim < 0:
        raise ValueError(f"trim must be >= 0, got {trim}")
    if align <= 0:
        raise ValueError(f"align must be > 0, got {align}")
    kept = n_tokens - trim
    if kept < align:
        return None
    return kept // align * align


def cold_save_split(n_tokens: int, policy: SavePolicy) -> int | None:
    """Return how many prompt tokens a cold save covers, or None for no save.

    No save when saves are disabled, the prompt is outside
    ``[cold_min_tokens, cold_max_tokens]``, the trimmed aligned prefix is
    empty (see :func:`trim_boundary`) or shorter than ``min_tokens``. The
    model prefills exactly that prefix, saves, then prefills the rest.

    Raises:
        ValueError: ``n_tokens < 0``.
    """
    if policy.min_tokens is None:
        return None
    if not policy.cold_min_tokens <= n_tokens <= policy.cold_max_tokens:
        return None
    length = trim_boundary(n_tokens, policy.boundary_trim_tokens, policy.boundary_align_tokens)
    if length is None or length < policy.min_tokens:
        return None
    return length


def should_continued_save(live: int, last_saved_at: int, policy: SavePolicy) -> bool:
    """Whether a context of ``live`` tokens gets a continued save now.

    True when at least ``continued_interval`` tokens were added since the
    last save (at ``last_saved_at`` tokens) and ``live >= min_tokens``.
    """
    if policy.min_tokens is None:
        return False
    return live - last_saved_at >= policy.continued_interval and live >= policy.min_tokens


def should_finish_save(live: int, policy: SavePolicy) -> bool:
    """Whether a finished request's context of ``live`` tokens is saved.

    True when ``live >= min_tokens`` and the context is not empty.
    """
    if policy.min_tokens is None:
        return False
    return live >= max(policy.min_tokens, 1)
