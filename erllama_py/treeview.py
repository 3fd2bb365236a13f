"""Drawing a supervision-tree snapshot (`Runtime.tree()`) with rich."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.tree import Tree

__all__ = ["render_tree"]

_STATE_STYLE = {"running": "green", "restarting": "yellow", "terminated": "red"}


def _label(node: Mapping[str, Any]) -> str:
    name = node.get("name") or node.get("id")
    state = str(node.get("state"))
    style = _STATE_STYLE.get(state, "magenta")
    parts = [f"[bold]{name}[/bold]", f"[{style}]{state}[/{style}]"]
    if node.get("kind") == "supervisor" and "strategy" in node:
        parts.append(f"{node['strategy']} {node.get('intensity')}/{node.get('period')}s")
    if node.get("pid"):
        parts.append(f"pid {node['pid']}")
    elif node.get("thread"):
        parts.append(f"thread {node['thread']}")
    if node.get("restarts"):
        parts.append(f"[yellow]restarts {node['restarts']}[/yellow]")
    if node.get("kind") != "supervisor":  # a supervisor shows its strategy instead
        parts.append(f"[dim]{node.get('kind')}[/dim]")
    started = node.get("started_at")
    if isinstance(started, int | float):
        parts.append(f"[dim]up {_uptime(time.time() - started)}[/dim]")
    if node.get("last_exit"):
        parts.append(f"[dim]last exit: {node['last_exit']}[/dim]")
    return "  ".join(parts)


def _uptime(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render_tree(snapshot: Mapping[str, Any]) -> Tree:
    """A rich `Tree` of a snapshot: names, states, strategies, pids or threads, restarts,
    kinds and uptimes."""
    root = Tree(_label(snapshot))
    _add(root, snapshot)
    return root


def _add(branch: Tree, node: Mapping[str, Any]) -> None:
    for child in node.get("children", ()):
        sub = branch.add(_label(child))
        _add(sub, child)
