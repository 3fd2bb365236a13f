"""Fixtures shared by the supervisors tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest

from supervisors import ProcessChild, Supervisor


@pytest.fixture(autouse=True)
def stop_all(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ProcessChild]]:
    """Tear down every tree, actor and process child a test leaves behind.

    Supervisors are stopped first, oldest first, so a root stops its subtree before anyone
    could restart a child that the registry-wide stop ends. Yields the process children
    spawned during the test.
    """
    spawned: list[ProcessChild] = []
    spawn = ProcessChild.spawn

    def tracking_spawn(target: Any, /, *args: Any, **kwargs: Any) -> ProcessChild:
        process = spawn(target, *args, **kwargs)
        spawned.append(process)
        return process

    monkeypatch.setattr(ProcessChild, "spawn", tracking_spawn)
    yield spawned
    for sup in pykka.ActorRegistry.get_by_class(Supervisor):
        sup.stop(block=True, timeout=10)
    pykka.ActorRegistry.stop_all(block=True, timeout=10)
    for process in spawned:
        if process.alive:
            process.kill()
            process.wait(5)
        process.close()


@pytest.fixture
def new_actors() -> Callable[[], list[pykka.ActorRef[Any]]]:
    """List the actors started during this test that are still registered.

    Relative to the test's start, so actors other test packages leave behind do not count.
    """
    before = pykka.ActorRegistry.get_all()
    return lambda: [ref for ref in pykka.ActorRegistry.get_all() if ref not in before]
