"""How long a context worker may take to answer one call before it is taken as hung.

A worker stopped by a signal, or wedged inside a llama.cpp call, never answers;
without a deadline its callers would wait forever. Each call's deadline is the
work it asks for (tokens decoded) times the model's measured time per token,
times a safety factor, and never less than a floor (a tokenize, a first step
before anything was measured, a pack). A worker that misses it is killed and
restarted by its supervisor (`WorkerClient`).

The measured speed is an exponential moving average over steps, kept in the
model's shared state so that it survives worker restarts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from erllama_py.config import DEFAULT_DEADLINE_FACTOR, DEFAULT_DEADLINE_FLOOR_S

__all__ = ["WorkerDeadline"]

_SMOOTHING = 0.2  # weight of the newest measurement in the moving average


@dataclass
class WorkerDeadline:
    """The deadline rule of one model (see the module docstring)."""

    floor_s: float = DEFAULT_DEADLINE_FLOOR_S
    factor: float = DEFAULT_DEADLINE_FACTOR
    _s_per_token: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def s_per_token(self) -> float | None:
        """The measured time per token of a step, or None before the first."""
        return self._s_per_token

    def for_work(self, tokens: int = 0) -> float:
        """Seconds a call decoding `tokens` tokens may take (at least the floor)."""
        rate = self._s_per_token
        if rate is None or tokens <= 0:
            return self.floor_s
        return max(self.floor_s, self.factor * tokens * rate)

    def record(self, tokens: int, elapsed_s: float) -> None:
        """Fold one step's measured time into the speed estimate."""
        if tokens <= 0 or elapsed_s < 0:
            return
        rate = elapsed_s / tokens
        with self._lock:
            old = self._s_per_token
            self._s_per_token = rate if old is None else old + _SMOOTHING * (rate - old)
