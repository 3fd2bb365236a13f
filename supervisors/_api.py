"""Module-level helpers that call a supervisor by its ref and wait for the answer.

Each one but `get_registry` goes through the supervisor's mailbox, like
``ref.proxy().method().get(timeout)``, without building a proxy; an error raised by the
supervisor is raised here.
"""

from __future__ import annotations

from typing import Any

import pykka
from pykka.messages import ProxyCall

from supervisors._registry import Registry
from supervisors._snapshot import ChildCounts, ChildInfo, TreeNode
from supervisors._spec import DEFAULT_TREE_TIMEOUT
from supervisors._supervisor import Supervisor
from supervisors._types import Handle

__all__ = [
    "start_child",
    "terminate_child",
    "restart_child",
    "delete_child",
    "which_children",
    "count_children",
    "tree",
    "get_registry",
]

# Extra seconds a tree() caller waits beyond the budget it gives the supervisor.
_TREE_MARGIN = 1.0


def _call(sup: pykka.ActorRef[Any], method: str, *args: Any, timeout: float | None) -> Any:
    return sup.ask(
        ProxyCall(attr_path=(method,), args=args, kwargs={}), block=True, timeout=timeout
    )


def start_child(sup: pykka.ActorRef[Any], *args: Any, timeout: float | None = None) -> Handle:
    """Call `Supervisor.start_child`: ``start_child(ref, spec)``, or ``start_child(ref, *extra)``
    under ``simple_one_for_one``."""
    result: Handle = _call(sup, "start_child", *args, timeout=timeout)
    return result


def terminate_child(
    sup: pykka.ActorRef[Any], child: str | Handle, *, timeout: float | None = None
) -> None:
    """Call `Supervisor.terminate_child`."""
    _call(sup, "terminate_child", child, timeout=timeout)


def restart_child(
    sup: pykka.ActorRef[Any], child_id: str, *, timeout: float | None = None
) -> Handle:
    """Call `Supervisor.restart_child`."""
    result: Handle = _call(sup, "restart_child", child_id, timeout=timeout)
    return result


def delete_child(sup: pykka.ActorRef[Any], child_id: str, *, timeout: float | None = None) -> None:
    """Call `Supervisor.delete_child`."""
    _call(sup, "delete_child", child_id, timeout=timeout)


def which_children(sup: pykka.ActorRef[Any], *, timeout: float | None = None) -> list[ChildInfo]:
    """Call `Supervisor.which_children`."""
    result: list[ChildInfo] = _call(sup, "which_children", timeout=timeout)
    return result


def count_children(sup: pykka.ActorRef[Any], *, timeout: float | None = None) -> ChildCounts:
    """Call `Supervisor.count_children`."""
    result: ChildCounts = _call(sup, "count_children", timeout=timeout)
    return result


def tree(sup: pykka.ActorRef[Any], *, timeout: float = DEFAULT_TREE_TIMEOUT) -> TreeNode:
    """Call `Supervisor.tree`: a JSON-serialisable snapshot of the whole subtree.

    Raises:
        pykka.Timeout: the supervisor itself did not answer within `timeout` plus a margin.
    """
    result: TreeNode = sup.ask(
        ProxyCall(attr_path=("tree",), args=(), kwargs={"timeout": timeout}),
        block=True,
        timeout=timeout + _TREE_MARGIN,
    )
    return result


def get_registry(sup: pykka.ActorRef[Any]) -> Registry:
    """Return the registry of a supervisor's tree, read directly (not through the mailbox).

    Raises:
        pykka.ActorDeadError: the supervisor is gone.
        TypeError: `sup` is not a supervisor.
    """
    actor = sup._actor_weakref()
    if actor is None:
        msg = f"{sup} is gone"
        raise pykka.ActorDeadError(msg)
    if not isinstance(actor, Supervisor):
        msg = f"{sup} is not a Supervisor"
        raise TypeError(msg)
    return actor.registry
