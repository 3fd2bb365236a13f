"""Restart intensity: OTP's sliding window, as a pure function.

A supervisor keeps the monotonic timestamps of its recent restarts. Before each restart it
drops those older than `period` seconds (it keeps ``t`` with ``now - t <= period``, as OTP
does), adds ``now``, and gives up if more than `intensity` remain. Time comes from an injected
clock, so tests step time instead of sleeping.

Restarts multiply across levels (each restart of a supervisor restarts its subtree), so keep
the upper levels' intensity low.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Clock", "RestartHistory", "add_restart"]

Clock = Callable[[], float]
"""A source of monotonic seconds, such as `time.monotonic`."""

RestartHistory = tuple[float, ...]
"""Timestamps of the restarts still inside the window, oldest first."""


def add_restart(
    history: RestartHistory, now: float, intensity: int, period: float
) -> tuple[RestartHistory, bool]:
    """Record a restart at `now` and tell whether the intensity is exceeded.

    Args:
        history: the timestamps of earlier restarts.
        now: the current monotonic time, in seconds.
        intensity: restarts allowed within `period`.
        period: the window length, in seconds.

    Returns:
        The new history (restarts within the window, then `now`) and whether it holds more
        than `intensity` restarts, in which case the supervisor must give up.
    """
    kept = tuple(t for t in history if now - t <= period)
    new_history = (*kept, now)
    return new_history, len(new_history) > intensity
