"""A context worker that stops answering (SIGSTOP: as a wedged llama.cpp call looks).

Every call into a worker has a deadline (`WorkerDeadline`: a floor, here a small one
configured per model); a worker that misses it is killed and restarted by its
supervisor. Requests running on it end with `WorkerCrashedError` saying it hung, direct
calls (tokenize) are served by its successor, the model reports the ``hung`` phase until
the new worker is up, and later requests succeed. A request's own ``timeout`` holds even
while the worker is stopped and its deadline is far away (the request watchdog).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest

from erllama_py import ErllamaError, Phase, RequestTimeoutError, Runtime, WorkerCrashedError
from erllama_py.results import Delta

# Small, so the test is quick; a stub call takes microseconds, so even a loaded machine
# answers well within it (the margin is the point: only a stopped worker misses it).
FLOOR_S = 2.0
PROMPT = "a b c d e f"


@pytest.fixture
def hung_rt(make_runtime: Any, load: Any) -> Runtime:
    rt = make_runtime()
    load(rt, "stub", "quick", deadline_floor_s=FLOOR_S, stub={"step_delay": 0.01})
    # A long floor: only the request's own timeout can end a request on it in time.
    load(rt, "stub", "patient", deadline_floor_s=600.0)
    return rt


def _pid(rt: Runtime, name: str) -> int:
    pid = rt.model(name).info().worker.pid
    assert isinstance(pid, int)
    return pid


def test_a_stopped_worker_is_killed_its_request_fails_typed_and_the_model_serves_again(
    hung_rt: Runtime, wait_until: Any
) -> None:
    m = hung_rt.model("quick")
    cold = m.complete(PROMPT, max_tokens=4)
    before = _pid(hung_rt, "quick")
    phases: list[Phase] = []
    stop_watching = threading.Event()

    def watch_phases() -> None:  # lock-free reads: what an operator's status poll sees
        while not stop_watching.is_set():
            phases.append(m.phase())
            stop_watching.wait(0.002)

    watcher = threading.Thread(target=watch_phases)
    watcher.start()
    try:
        with pytest.raises(WorkerCrashedError) as caught:  # noqa: PT012
            for event in m.stream(PROMPT, max_tokens=100_000):
                if isinstance(event, Delta) and event.tokens:
                    os.kill(before, signal.SIGSTOP)  # mid-generation: a step never answers
        wait_until(lambda: m.info().worker.pid not in (None, before), "the worker restarted")
        wait_until(lambda: m.phase() is Phase.IDLE, "the model to be idle again")
    finally:
        stop_watching.set()
        watcher.join()
        phases.append(m.phase())  # the watcher may have stopped between its last read and IDLE
    error = caught.value
    assert error.hung_s == FLOOR_S
    assert "hung" in str(error) and "killed" in str(error)
    assert error.exitcode == -signal.SIGKILL
    assert Phase.HUNG in phases  # between the kill and the new worker ...
    last_hung = len(phases) - 1 - phases[::-1].index(Phase.HUNG)
    assert Phase.IDLE in phases[last_hung:]  # ... and not after it
    info = m.info()
    assert info.worker_hangs == 1 and info.worker.restarts == 1
    assert m.complete(PROMPT, max_tokens=4).tokens == cold.tokens  # served again, same output


def test_a_direct_call_to_a_stopped_worker_is_served_by_its_successor(
    hung_rt: Runtime,
) -> None:
    m = hung_rt.model("quick")
    tokens = m.tokenize(PROMPT)
    before = _pid(hung_rt, "quick")
    os.kill(before, signal.SIGSTOP)
    try:
        again = m.tokenize(PROMPT)  # never a Pykka error: killed at the deadline, retried
    except ErllamaError as exc:  # the only other allowed outcome: a typed error
        pytest.fail(f"the retry on the restarted worker should succeed, got {exc!r}")
    assert again == tokens
    assert _pid(hung_rt, "quick") != before
    assert m.info().worker_hangs == 1


def test_a_request_timeout_holds_while_the_worker_is_stopped(hung_rt: Runtime) -> None:
    m = hung_rt.model("patient")
    m.complete(PROMPT, max_tokens=2)
    pid = _pid(hung_rt, "patient")
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(RequestTimeoutError) as caught:
            m.complete(PROMPT + " g", max_tokens=4, timeout=0.5)
        assert "timeout of 0.5 s" in str(caught.value)
    finally:
        os.kill(pid, signal.SIGKILL)  # its deadline is 600 s away: end it (it is restarted)
