"""Restart intensity as a pure function over an injected clock (supervisors/_intensity.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sup_helpers import FakeClock

from supervisors import add_restart
from supervisors._intensity import RestartHistory


def test_restarts_up_to_the_intensity_are_allowed() -> None:
    clock = FakeClock()
    history: RestartHistory = ()
    for _ in range(3):
        history, exceeded = add_restart(history, clock(), intensity=3, period=10.0)
        assert not exceeded
        clock.advance(1.0)
    assert len(history) == 3


def test_one_restart_more_than_the_intensity_within_the_period_is_exceeded() -> None:
    clock = FakeClock()
    history: RestartHistory = ()
    for _ in range(3):
        history, _exceeded = add_restart(history, clock(), intensity=3, period=10.0)
        clock.advance(1.0)
    _history, exceeded = add_restart(history, clock(), intensity=3, period=10.0)
    assert exceeded


def test_restarts_spread_wider_than_the_period_never_exceed() -> None:
    clock = FakeClock()
    history: RestartHistory = ()
    for _ in range(50):
        history, exceeded = add_restart(history, clock(), intensity=1, period=5.0)
        assert not exceeded
        clock.advance(5.001)


def test_a_restart_exactly_period_seconds_old_still_counts() -> None:
    # OTP keeps restarts with now - t <= period.
    history, _ = add_restart((), 100.0, intensity=1, period=5.0)
    history, exceeded = add_restart(history, 105.0, intensity=1, period=5.0)
    assert exceeded
    assert history == (100.0, 105.0)


def test_zero_intensity_exceeds_on_the_first_restart() -> None:
    _history, exceeded = add_restart((), 0.0, intensity=0, period=1.0)
    assert exceeded


def test_add_restart_does_not_change_its_input() -> None:
    history = (1.0, 2.0)
    add_restart(history, 3.0, intensity=5, period=10.0)
    assert history == (1.0, 2.0)


timestamps = st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=30).map(
    lambda ts: tuple(sorted(ts))
)
periods = st.floats(min_value=0.001, max_value=500, allow_nan=False)
intensities = st.integers(min_value=0, max_value=20)


@given(history=timestamps, period=periods, intensity=intensities, step=periods)
def test_restart_window_drops_restarts_older_than_period(
    history: RestartHistory, period: float, intensity: int, step: float
) -> None:
    now = (history[-1] if history else 0.0) + step
    new_history, _ = add_restart(history, now, intensity, period)
    assert new_history[-1] == now
    assert all(now - t <= period for t in new_history)
    assert [t for t in history if now - t <= period] == list(new_history[:-1])


@given(history=timestamps, period=periods, intensity=intensities, step=periods)
def test_intensity_is_exceeded_exactly_when_the_window_holds_more_than_intensity(
    history: RestartHistory, period: float, intensity: int, step: float
) -> None:
    now = (history[-1] if history else 0.0) + step
    new_history, exceeded = add_restart(history, now, intensity, period)
    in_window = sum(1 for t in history if now - t <= period) + 1
    assert exceeded == (in_window > intensity)
    assert len(new_history) == in_window


@given(
    gaps=st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=40),
    period=periods,
    intensity=intensities,
)
def test_history_never_holds_more_than_one_restart_beyond_the_intensity_when_reset(
    gaps: list[float], period: float, intensity: int
) -> None:
    # A supervisor dies at the first exceeded restart, so a live one's history is bounded.
    clock = FakeClock(0.0)
    history: RestartHistory = ()
    for gap in gaps:
        clock.advance(gap)
        history, exceeded = add_restart(history, clock(), intensity, period)
        assert len(history) <= intensity + 1
        if exceeded:
            history = ()
