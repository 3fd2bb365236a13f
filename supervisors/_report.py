"""Structured reports on the ``supervisors`` logger, after OTP's error and progress reports.

Each incident is one record whose extra attributes are OTP's four fields: ``supervisor``
(its name), ``context`` (``start_error``, ``child_terminated``, ``shutdown_error`` or
``shutdown``), ``reason`` (a string) and ``offender`` (a dict: id, name, pid, thread,
restart, shutdown, kind). Each child start is one DEBUG record with ``context="progress"``.
"""

from __future__ import annotations

import logging
from typing import Literal

from supervisors._reason import describe_reason

__all__ = ["Context", "Offender", "logger", "report_error", "report_progress"]

logger = logging.getLogger("supervisors")

Context = Literal["start_error", "child_terminated", "shutdown_error", "shutdown"]
Offender = dict[str, str | int | float | None]


def report_error(supervisor: str, context: Context, reason: object, offender: Offender) -> None:
    """Log one incident at ERROR level."""
    text = describe_reason(reason)
    logger.error(
        "supervisor %s: %s, reason: %s, offender: %s",
        supervisor,
        context,
        text,
        offender,
        extra={"supervisor": supervisor, "context": context, "reason": text, "offender": offender},
    )


def report_progress(supervisor: str, offender: Offender) -> None:
    """Log one child start at DEBUG level."""
    logger.debug(
        "supervisor %s: started child %s",
        supervisor,
        offender,
        extra={
            "supervisor": supervisor,
            "context": "progress",
            "reason": None,
            "offender": offender,
        },
    )
