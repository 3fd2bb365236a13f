"""What a supervisor reports about its children: `ChildInfo`, `ChildCounts` and `TreeNode`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

import pykka

from supervisors._reason import describe_reason
from supervisors._spec import Kind, RestartType, Strategy
from supervisors._types import Handle

__all__ = ["ChildState", "ChildInfo", "ChildCounts", "TreeNode", "merge_subtree"]

ChildState = Literal["running", "restarting", "terminated"]
"""``running``: an instance is alive. ``restarting``: a restart failed and a retry is queued.
``terminated``: no instance (terminated by request, or a transient child's normal exit)."""


@dataclass(frozen=True)
class ChildInfo:
    """One child, as `which_children` sees it.

    Attributes:
        id: the child's id (generated under ``simple_one_for_one``).
        kind: ``worker`` or ``supervisor``.
        state: see `ChildState`.
        restarts: how many times the supervisor restarted it.
        restart: its restart type.
        handle: the current instance (`pykka.ActorRef` or `ProcessChild`), None if not running.
        pid: the process id of a process child.
        thread: the thread name of an actor child.
        name: its registry name, if any.
        last_exit: the exit reason of its previous instance, None if none has ended.
        started_at: when its current instance started (``time.time()``), None if none runs.
    """

    id: str
    kind: Kind
    state: ChildState
    restarts: int
    restart: RestartType
    handle: Handle | None
    pid: int | None
    thread: str | None
    name: str | None
    last_exit: object
    started_at: float | None = None

    def to_node(self) -> TreeNode:
        """This child as a JSON-serialisable tree node (without subtree)."""
        return TreeNode(
            id=self.id,
            name=self.name,
            kind=self.kind,
            state=self.state,
            restart=self.restart,
            restarts=self.restarts,
            pid=self.pid,
            thread=self.thread,
            last_exit=None if self.last_exit is None else describe_reason(self.last_exit),
            started_at=self.started_at,
        )


@dataclass(frozen=True)
class ChildCounts:
    """OTP's `count_children`.

    Attributes:
        specs: children, running or not (1 under ``simple_one_for_one``: the template).
        active: children with a running instance.
        supervisors: children of kind ``supervisor``, running or not.
        workers: children of kind ``worker``, running or not.
    """

    specs: int
    active: int
    supervisors: int
    workers: int

    @classmethod
    def of(cls, children: Sequence[ChildInfo], template: Kind | None = None) -> ChildCounts:
        """Count `children`; `template` is the template's kind under simple_one_for_one."""
        active = sum(child.state == "running" for child in children)
        if template is not None:
            dynamic = len(children)
            return cls(
                specs=1,
                active=active,
                supervisors=dynamic if template == "supervisor" else 0,
                workers=dynamic if template == "worker" else 0,
            )
        supervisors = sum(child.kind == "supervisor" for child in children)
        return cls(len(children), active, supervisors, len(children) - supervisors)


class TreeNode(TypedDict):
    """A JSON-serialisable snapshot of a child or a supervisor, with its subtree.

    `started_at` is when the running instance started (``time.time()``), None if none runs.
    A supervisor node adds `strategy`, `intensity`, `period` and `children`. `state` is one
    of `ChildState`, or ``unresponsive`` for a child supervisor that did not answer in time.
    """

    id: str
    name: str | None
    kind: Kind
    state: str
    restart: RestartType | None
    restarts: int
    pid: int | None
    thread: str | None
    last_exit: str | None
    started_at: NotRequired[float | None]
    strategy: NotRequired[Strategy]
    intensity: NotRequired[int]
    period: NotRequired[float]
    children: NotRequired[list[TreeNode]]


def merge_subtree(node: TreeNode, answer: pykka.Future[Any], deadline: float) -> None:
    """Complete a child supervisor's node with the tree it answers by `deadline`.

    A child supervisor that does not answer in time (or dies first) is marked
    ``unresponsive``; the snapshot does not wait for it any longer.
    """
    try:
        subtree: TreeNode = answer.get(timeout=max(0.0, deadline - time.monotonic()))
    except Exception:
        node["state"] = "unresponsive"
        return
    node["name"] = node["name"] or subtree["name"]
    node["strategy"] = subtree["strategy"]
    node["intensity"] = subtree["intensity"]
    node["period"] = subtree["period"]
    node["children"] = subtree["children"]
