"""Introspection: which_children, count_children and tree (supervisors/_snapshot.py)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pykka
from pykka.messages import ProxyCall
from sup_helpers import WAIT, Crash, Hang, Worker, handle_of, spawn_obedient, wait_exit_processed

from supervisors import (
    ChildCounts,
    ChildSpec,
    ProcessChild,
    Supervisor,
    count_children,
    terminate_child,
    tree,
    which_children,
)


def _worker(child_id: str, **options: Any) -> ChildSpec:
    return ChildSpec(child_id, lambda: Worker.start(child_id), **options)


def _middle() -> Any:
    return Supervisor.start(
        "mid", strategy="rest_for_one", intensity=2, period=9.0, children=[_worker("leaf")]
    )


def _whole_tree() -> pykka.ActorRef[Any]:
    return Supervisor.start(
        "root",
        strategy="one_for_all",
        intensity=3,
        period=7.5,
        children=[
            _worker("a", name="alpha"),
            ChildSpec("mid", _middle, kind="supervisor"),
            ChildSpec("proc", spawn_obedient, name="proc"),
        ],
    )


def test_which_children_describes_every_child_in_order() -> None:
    sup = _whole_tree()
    a, mid, proc = which_children(sup)
    assert (a.id, a.kind, a.state, a.restarts, a.name) == ("a", "worker", "running", 0, "alpha")
    assert isinstance(a.handle, pykka.ActorRef)
    assert a.thread is not None
    assert a.pid is None
    assert (mid.id, mid.kind) == ("mid", "supervisor")
    assert isinstance(proc.handle, ProcessChild)
    assert proc.pid == proc.handle.pid
    assert proc.thread is None


def test_count_children_gives_otps_four_counts() -> None:
    sup = _whole_tree()
    assert count_children(sup) == ChildCounts(specs=3, active=3, supervisors=1, workers=2)
    terminate_child(sup, "a", timeout=WAIT)
    assert count_children(sup) == ChildCounts(specs=3, active=2, supervisors=1, workers=2)


def test_count_children_of_simple_one_for_one_counts_the_template_once() -> None:
    sup = Supervisor.start(
        "pool", strategy="simple_one_for_one", children=[ChildSpec("w", Worker.start)]
    )
    for _ in range(3):
        sup.ask(ProxyCall(("start_child",), (), {}), timeout=WAIT)
    assert count_children(sup) == ChildCounts(specs=1, active=3, supervisors=0, workers=3)


def test_tree_is_json_serialisable_and_complete() -> None:
    sup = _whole_tree()
    snapshot = tree(sup)
    assert json.loads(json.dumps(snapshot)) == snapshot

    assert snapshot["id"] == snapshot["name"] == "root"
    assert (snapshot["kind"], snapshot["state"]) == ("supervisor", "running")
    assert (snapshot["strategy"], snapshot["intensity"], snapshot["period"]) == (
        "one_for_all",
        3,
        7.5,
    )
    assert snapshot["thread"] is not None
    a, mid, proc = snapshot["children"]
    assert (a["id"], a["name"], a["kind"], a["state"], a["restarts"]) == (
        "a",
        "alpha",
        "worker",
        "running",
        0,
    )
    assert a["thread"] is not None
    assert proc["pid"] == handle_of(sup, "proc").pid
    assert (mid["kind"], mid["name"], mid["strategy"], mid["intensity"], mid["period"]) == (
        "supervisor",
        "mid",
        "rest_for_one",
        2,
        9.0,
    )
    (leaf,) = mid["children"]
    assert (leaf["id"], leaf["state"], leaf["kind"]) == ("leaf", "running", "worker")


def test_tree_shows_restarts_and_the_last_exit_reason() -> None:
    sup = Supervisor.start("sup", children=[_worker("a")])
    first = handle_of(sup, "a")
    first.tell(Crash())
    wait_exit_processed(sup, "a", first)
    (a,) = tree(sup)["children"]
    assert a["restarts"] == 1
    assert a["last_exit"] == "RuntimeError: a crashed"


def test_unresponsive_child_supervisor_is_shown_as_such_instead_of_hanging() -> None:
    sup = Supervisor.start(
        "root",
        children=[
            ChildSpec(
                "mid",
                lambda: Supervisor.start(
                    "mid", children=[_worker("stuck", shutdown="infinity"), _worker("b")]
                ),
                kind="supervisor",
            )
        ],
    )
    mid = handle_of(sup, "mid")
    hang = Hang(threading.Event())
    handle_of(mid, "stuck").tell(hang)
    assert hang.entered.wait(WAIT)
    # mid now waits, for as long as it takes, for the stuck child to stop.
    busy = mid.ask(ProxyCall(("terminate_child",), ("stuck",), {}), block=False)
    try:
        snapshot = tree(sup, timeout=0.2)
        (node,) = snapshot["children"]
        assert node["state"] == "unresponsive"
        assert node["id"] == "mid"
        assert "children" not in node
        json.dumps(snapshot)
    finally:
        hang.release.set()
    busy.get(timeout=WAIT)
    assert tree(sup)["children"][0]["state"] == "running"


def test_child_info_and_tree_of_a_terminated_child_have_no_instance() -> None:
    sup = Supervisor.start("sup", children=[_worker("a")])
    terminate_child(sup, "a", timeout=WAIT)
    (info,) = which_children(sup)
    assert (info.state, info.handle, info.thread, info.pid) == ("terminated", None, None, None)
    (node,) = tree(sup)["children"]
    assert (node["state"], node["thread"], node["last_exit"]) == ("terminated", None, "shutdown")
