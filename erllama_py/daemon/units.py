"""Byte counts as people read them, for the status lines and tables of the CLI."""

from __future__ import annotations

__all__ = ["format_size"]


def format_size(n: int) -> str:
    """`n` bytes in B, KiB, MiB or GiB (one decimal past bytes)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
