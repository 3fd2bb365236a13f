"""The supervisor's record of one child: its spec and its current instance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supervisors._process import ProcessChild
from supervisors._report import Offender
from supervisors._snapshot import ChildInfo, ChildState
from supervisors._spec import ChildSpec
from supervisors._types import Handle
from supervisors._watch import Monitor

__all__ = ["ChildRecord"]


@dataclass(eq=False)
class ChildRecord:
    """One child as its supervisor tracks it. Only the supervisor's thread touches it."""

    spec: ChildSpec
    id: str
    args: tuple[Any, ...] = ()
    """`start_child`'s arguments, passed to the template's start under simple_one_for_one."""
    state: ChildState = "terminated"
    handle: Handle | None = None
    monitor: Monitor | None = None
    # Invariant: bumped on every start; a death notice carrying another generation is stale.
    generation: int = 0
    restarts: int = 0
    last_exit: object = None
    started_at: float | None = None

    def info(self) -> ChildInfo:
        """A snapshot for `which_children`."""
        handle = self.handle
        return ChildInfo(
            id=self.id,
            kind=self.spec.kind,
            state=self.state,
            restarts=self.restarts,
            restart=self.spec.restart,
            handle=handle,
            pid=handle.pid if isinstance(handle, ProcessChild) else None,
            thread=self.monitor.thread_name if self.monitor is not None else None,
            name=self.spec.name,
            last_exit=self.last_exit,
            started_at=self.started_at if self.state == "running" else None,
        )

    def offender(self) -> Offender:
        """OTP's offender: who the child is, for reports."""
        info = self.info()
        return {
            "id": self.id,
            "name": self.spec.name,
            "pid": info.pid,
            "thread": info.thread,
            "restart": self.spec.restart,
            "shutdown": self.spec.shutdown,
            "kind": self.spec.kind,
        }
