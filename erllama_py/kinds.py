"""The named kinds that cross the rooms: tiers, save reasons, cache hits, finishes, phases.

Each is a `StrEnum`, so a value compares equal to its string (``HitKind.EXACT
== "exact"``), serialises to JSON as that string, and mypy checks every use.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["FinishReason", "HitKind", "Phase", "SaveReason", "TierKind"]


class TierKind(StrEnum):
    """Where a cache tier keeps its rows."""

    RAM = "ram"
    """In this process's memory (shared-memory buffers handed to workers by descriptor)."""
    RAM_FILE = "ram_file"
    """Files on a tmpfs: survive a runtime restart, not a reboot."""
    DISK = "disk"
    """Files on disk."""


class SaveReason(StrEnum):
    """Why a row was saved (stored in its file header)."""

    COLD = "cold"
    """After a prefill computed from nothing: the state a cold run of these tokens has."""
    CONTINUED = "continued"
    """During a long generation, every ``continued_interval`` tokens."""
    FINISH = "finish"
    """When a request ended: its ``finish_key``."""
    EVICT = "evict"
    """`evict()` saved a request in flight."""
    SHUTDOWN = "shutdown"
    """An unload or a stop saved a request in flight (its ``finish_key``)."""


class HitKind(StrEnum):
    """How a request's prompt was found in the cache."""

    EXACT = "exact"
    """A row holding exactly the prompt: nothing to prefill."""
    PARENT = "parent"
    """The row named by ``parent_key`` (the previous turn), a prefix of the prompt."""
    PREFIX = "prefix"
    """The row sharing the longest prefix with the prompt; the rest is prefilled."""
    COLD = "cold"
    """Nothing usable: the whole prompt is prefilled."""


class FinishReason(StrEnum):
    """Why a completion ended."""

    STOP = "stop"
    """The model ended its turn, or a stop sequence matched."""
    LENGTH = "length"
    """``max_tokens`` was reached, or the context is full."""
    CANCELLED = "cancelled"
    """The caller cancelled it (or the model was unloaded under it)."""


class Phase(StrEnum):
    """What a model is doing (read without its mailbox; it lags by up to one tick)."""

    IDLE = "idle"
    PREFILLING = "prefilling"
    GENERATING = "generating"
    RESTARTING = "restarting"
    """Its worker died and is being restarted; queued requests wait for it."""
    HUNG = "hung"
    """Its worker missed a deadline and is being killed and restarted."""
    FAILED = "failed"
    """Its worker kept crashing: unload and load it again."""
