"""`supervisors.kill`: a crash injected into a child, which its supervisor restarts."""

from __future__ import annotations

import pykka
import pytest
from sup_helpers import (
    PlainWorker,
    child,
    spawn_obedient,
    wait_exit_processed,
    wait_rebound,
    wait_until,
    worker_spec,
)

from supervisors import ChildSpec, NoProcError, Supervisor, get_registry, kill, tree


@pytest.fixture
def sup() -> pykka.ActorRef[Supervisor]:
    ref = Supervisor.start(
        "kill_sup",
        strategy="one_for_one",
        intensity=10,
        period=60.0,
        children=[
            worker_spec("actor", name="kill_sup/actor"),
            ChildSpec("plain", PlainWorker.start, name="kill_sup/plain"),
            ChildSpec("proc", spawn_obedient, name="kill_sup/proc"),
        ],
    )
    yield ref
    ref.stop(timeout=10)


# A plain Pykka actor's thread dies of the injected exception, which pytest reports.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("child_id", ["actor", "plain", "proc"])
def test_a_killed_child_is_restarted_with_one_more_restart(sup, child_id) -> None:
    registry = get_registry(sup)
    name = f"kill_sup/{child_id}"
    old = registry.lookup(name)
    first_start = child(sup, child_id).started_at
    kill(old)
    wait_exit_processed(sup, child_id, old)
    new = wait_rebound(registry, name, old)
    info = wait_until(lambda: child(sup, child_id))
    assert info.handle is new
    assert info.restarts == 1
    assert info.last_exit is not None
    assert "kill" in str(info.last_exit).lower() or "SIGKILL" in str(info.last_exit)
    assert first_start is not None and info.started_at is not None
    assert info.started_at >= first_start
    node = next(n for n in tree(sup)["children"] if n["id"] == child_id)
    assert node["started_at"] == info.started_at


def test_killing_an_instance_that_has_ended_is_noproc(sup) -> None:
    registry = get_registry(sup)
    old = registry.lookup("kill_sup/actor")
    kill(old)
    wait_exit_processed(sup, "actor", old)
    with pytest.raises(NoProcError):
        kill(old)
