"""Stopping a `threading.Timer` so that its thread is gone when the owner stops."""

from __future__ import annotations

import threading

__all__ = ["stop_timer"]

JOIN_TIMEOUT_S = 1.0  # the callbacks only post a message; a stuck one is not waited for


def stop_timer(timer: threading.Timer | None) -> None:
    """Cancel `timer` and wait for its thread to end (`rt.stop()` leaves no thread)."""
    if timer is None:
        return
    timer.cancel()
    if timer.ident is not None and timer is not threading.current_thread():
        timer.join(JOIN_TIMEOUT_S)
