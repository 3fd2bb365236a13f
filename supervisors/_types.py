"""Type aliases shared by the modules."""

from __future__ import annotations

from typing import Any, TypeAlias

import pykka

from supervisors._process import ProcessChild

__all__ = ["Handle"]

Handle: TypeAlias = pykka.ActorRef[Any] | ProcessChild
"""A child's running instance: a Pykka actor or an OS process."""
