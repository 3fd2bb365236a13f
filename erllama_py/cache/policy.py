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

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from erllama_py.errors import ConfigError

__all__ = [
    "SavePolicy",
    "validate_policy",
    "trim_boundary",
    "cold_save_split",
    "should_continued_save",
    "should_finish_save",
]


@dataclass(frozen=True)
class SavePolicy:
    """A validated save policy; construction checks every rule.

    Raises:
        ConfigError: a field breaks a rule; the key is ``policy.<field>``
            (use :func:`validate_policy` for another key path).
    """

    min_tokens: int | None = 512  # tokens; floor of every gated save; None = never save
    cold_min_tokens: int = 512  # tokens; shortest prompt that gets a cold save
    cold_max_tokens: int = 30000  # tokens; longest prompt that gets a cold save
    continued_interval: int = 2048  # tokens generated between continued saves
    boundary_trim_tokens: int = 32  # tokens dropped from a cold save's tail before aligning
    boundary_align_tokens: int = 2048  # tokens; cold-save alignment and longest-prefix stride
    session_resume_wait_ms: int = 500  # ms to wait for an in-flight save of a parent key

    def __post_init__(self) -> None:
        _check_values({f.name: getattr(self, f.name) for f in fields(self)}, "policy")

    @property
    def saves_enabled(self) -> bool:
        """False when ``min_tokens`` is None: no gated save ever fires."""
        return self.min_tokens is not None


_FIELD_NAMES = tuple(f.name for f in fields(SavePolicy))
# The smallest value each field accepts; None is also accepted where listed.
_MINIMUMS = {
    "min_tokens": 0,
    "cold_min_tokens": 0,
    "cold_max_tokens": 0,
    "continued_interval": 1,
    "boundary_trim_tokens": 0,
    "boundary_align_tokens": 1,
    "session_resume_wait_ms": 0,
}
_NULLABLE = frozenset({"min_tokens"})


def _check_field(name: str, value: object, prefix: str) -> None:
    if value is None and name in _NULLABLE:
        return
    minimum = _MINIMUMS[name]
    bound = "> 0" if minimum == 1 else f">= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}.{name}", f"must be an integer {bound}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{prefix}.{name}", f"must be {bound}, got {value}")


def _check_values(values: Mapping[str, Any], prefix: str) -> None:
    for name in _FIELD_NAMES:
        _check_field(name, values[name], prefix)
    min_tokens, cold_min, cold_max = (
        values["min_tokens"],
        values["cold_min_tokens"],
        values["cold_max_tokens"],
    )
    if min_tokens is not None and cold_min < min_tokens:
        reason = f"must be >= min_tokens ({min_tokens}), got {cold_min}"
        raise ConfigError(f"{prefix}.cold_min_tokens", reason)
    if cold_max < cold_min:
        reason = f"must be >= cold_min_tokens ({cold_min}), got {cold_max}"
        raise ConfigError(f"{prefix}.cold_max_tokens", reason)


def validate_policy(value: object, key_prefix: str = "policy") -> SavePolicy:
    """Build a :class:`SavePolicy` from a mapping (missing keys take defaults).

    A :class:`SavePolicy` is returned as is and ``None`` gives the defaults.
    Rules: every field is an int (a bool is not) >= 0; ``min_tokens`` may be
    None; ``continued_interval`` and ``boundary_align_tokens`` are > 0;
    ``cold_min_tokens >= min_tokens``; ``cold_max_tokens >= cold_min_tokens``.

    Raises:
        ConfigError: with the full key path, e.g.
            ``policy.cold_min_tokens: must be >= min_tokens (512), got 100``;
            also for an unknown key or a value that is not a mapping.
    """
    if value is None:
        return SavePolicy()
    if isinstance(value, SavePolicy):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(key_prefix, f"must be a mapping, got {type(value).__name__}")
    for name in value:
        if name not in _FIELD_NAMES:
            known = ", ".join(_FIELD_NAMES)
            raise ConfigError(f"{key_prefix}.{name}", f"unknown key (known keys: {known})")
    defaults = SavePolicy()
    merged = {name: value.get(name, getattr(defaults, name)) for name in _FIELD_NAMES}
    _check_values(merged, key_prefix)
    return SavePolicy(**merged)


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
