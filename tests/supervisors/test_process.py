"""Process children: spawning, exits, channels, supervision (supervisors/_process.py)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from sup_helpers import (
    WAIT,
    actor,
    echo_args,
    handle_of,
    obedient,
    process,
    read_fd,
    ready_pid,
    spawn_obedient,
    wait_exit_processed,
    wait_rebound,
    wait_until,
)

from supervisors import ChildSpec, ProcessChild, ProcessExit, Supervisor, get_registry

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def test_target_runs_in_a_fresh_interpreter_with_the_parents_sys_path() -> None:
    process = ProcessChild.spawn(echo_args, 1, "two", {"three": 3})
    report = process.channel.recv()
    assert report["args"] == (1, "two", {"three": 3})
    assert report["main_file"] is None  # the child's __main__ is the -c bootstrap
    assert report["sys_path"] == sys.path
    assert report["ppid"] == os.getpid()
    assert process.wait(WAIT) == 0
    assert (process.alive, process.signal) == (False, None)


def test_target_can_be_named_by_a_string_without_importing_it_here() -> None:
    process = ProcessChild.spawn("sup_helpers:echo_args", "x")
    assert process.channel.recv()["args"] == ("x",)
    assert process.name == "sup_helpers:echo_args"


@pytest.mark.parametrize(
    ("command", "exitcode"),
    [
        pytest.param("return", 0, id="return"),
        pytest.param(("exit", 0), 0, id="exit-0"),
        pytest.param(("exit", 3), 3, id="exit-3"),
        pytest.param("raise", 1, id="raise"),
        pytest.param("segv", -signal.SIGSEGV, id="segv"),
        pytest.param("abort", -signal.SIGABRT, id="abort"),
    ],
)
def test_exit_code_tells_how_the_target_ended(command: object, exitcode: int) -> None:
    process = spawn_obedient()
    ready_pid(process)
    process.channel.send(command)
    assert process.wait(WAIT) == exitcode


def test_signal_names_the_signal_that_killed_the_process() -> None:
    process = spawn_obedient()
    ready_pid(process)
    process.kill()
    assert process.wait(WAIT) == -9
    assert process.signal == "SIGKILL"
    assert str(ProcessExit(-9)) == "killed by SIGKILL"
    assert str(ProcessExit(3)) == "exit code 3"


def test_wait_returns_none_while_the_process_runs() -> None:
    process = spawn_obedient()
    assert process.wait(0.01) is None
    assert process.alive


def test_channel_is_duplex() -> None:
    process = spawn_obedient()
    ready_pid(process)
    process.channel.send(("echo", {"payload": [1, 2, 3]}))
    assert process.channel.recv() == {"payload": [1, 2, 3]}


def test_file_descriptors_pass_over_the_raw_socket() -> None:
    process = ProcessChild.spawn(read_fd)
    assert process.channel.recv() == "ready"
    read_end, write_end = os.pipe()
    os.write(write_end, b"through the fd")
    os.close(write_end)
    process.channel.send_fds(b"x", [read_end])
    os.close(read_end)
    assert process.channel.recv() == b"through the fd"
    assert process.socket is process.channel.socket


def test_done_callback_runs_once_the_process_is_reaped() -> None:
    process = spawn_obedient()
    reaped = threading.Event()
    codes: list[int | None] = []

    def done(reaped_process: ProcessChild) -> None:
        codes.append(reaped_process.exitcode)
        reaped.set()

    process.add_done_callback(done)
    process.kill()
    assert reaped.wait(WAIT)
    late: list[int | None] = []
    process.add_done_callback(lambda p: late.append(p.exitcode))
    assert codes == late == [-9]


def test_target_defined_in_main_is_refused() -> None:
    def target(channel: Any) -> None: ...

    target.__module__ = "__main__"
    with pytest.raises(ValueError, match="defined in __main__"):
        ProcessChild.spawn(target)
    with pytest.raises(ValueError, match="defined in __main__"):
        ProcessChild.spawn("__main__:target")


def test_nested_functions_and_lambdas_are_refused() -> None:
    def nested(channel: Any) -> None: ...

    with pytest.raises(ValueError, match="module-level"):
        ProcessChild.spawn(nested)
    with pytest.raises(ValueError, match="module-level"):
        ProcessChild.spawn(lambda channel: None)
    with pytest.raises(ValueError, match=r"'package\.module:function'"):
        ProcessChild.spawn("no_colon")


def test_unpicklable_arguments_fail_in_the_parent_before_anything_starts(
    stop_all: list[ProcessChild],
) -> None:
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        ProcessChild.spawn(echo_args, threading.Lock())
    assert stop_all == []


@pytest.mark.parametrize(
    ("kill", "exitcode"),
    [
        pytest.param(lambda p, pid: os.kill(pid, signal.SIGKILL), -9, id="sigkill"),
        pytest.param(lambda p, pid: p.channel.send("segv"), -11, id="sigsegv"),
        pytest.param(lambda p, pid: p.channel.send("abort"), -6, id="abort"),
        pytest.param(lambda p, pid: p.channel.send("raise"), 1, id="exception"),
        pytest.param(lambda p, pid: p.channel.send(("exit", 0)), 0, id="exit-0"),
    ],
)
def test_permanent_process_child_is_restarted_however_it_dies(kill: Any, exitcode: int) -> None:
    sup = Supervisor.start("sup", children=[ChildSpec("p", spawn_obedient, name="p")])
    registry = get_registry(sup)
    first = process(registry.lookup("p"))
    first_pid = ready_pid(first)

    kill(first, first_pid)
    assert first.wait(WAIT) == exitcode
    second = process(registry.wait_for("p", timeout=WAIT))

    assert second is not first
    assert ready_pid(second) not in (first_pid, None)
    (info,) = [c for c in __import__("supervisors").which_children(sup) if c.id == "p"]
    assert info.restarts == 1
    assert info.last_exit == ("normal" if exitcode == 0 else ProcessExit(exitcode))
    assert first.channel.closed


@pytest.mark.parametrize(
    ("command", "restarted"),
    [
        pytest.param(("exit", 0), False, id="transient-normal"),
        pytest.param(("exit", 3), True, id="transient-abnormal"),
    ],
)
def test_transient_process_child_is_restarted_only_after_an_abnormal_exit(
    command: object, restarted: bool
) -> None:
    sup = Supervisor.start(
        "sup", children=[ChildSpec("p", spawn_obedient, restart="transient", name="p")]
    )
    first: ProcessChild = handle_of(sup, "p")
    ready_pid(first)
    first.channel.send(command)
    first.wait(WAIT)
    wait_exit_processed(sup, "p", first)
    (info,) = __import__("supervisors").which_children(sup)
    assert (info.state == "running") == restarted
    if not restarted:
        assert info.last_exit == "normal"
        assert get_registry(sup).whereis("p") is None


def test_restart_follows_the_death_of_a_process_child() -> None:
    # Order and outcome, not speed (how fast a restart is belongs to bench/).
    sup = Supervisor.start("sup", children=[ChildSpec("p", spawn_obedient, name="p")])
    registry = get_registry(sup)
    first = process(registry.lookup("p"))
    first_pid = ready_pid(first)
    first.kill()
    assert first.wait(WAIT) == -9
    second = process(wait_rebound(registry, "p", first))
    assert ready_pid(second) != first_pid
    assert second.exitcode is None


def test_restart_follows_the_death_of_an_actor_child() -> None:
    from sup_helpers import Crash, worker_spec

    sup = Supervisor.start("sup", children=[worker_spec("a", name="a")])
    registry = get_registry(sup)
    first = actor(registry.lookup("a"))
    first.tell(Crash())
    assert first.actor_stopped.wait(WAIT)
    second = actor(wait_rebound(registry, "a", first))
    assert second.ask("ping", timeout=WAIT) is None


def test_process_child_dies_when_its_parent_dies(tmp_path: Path) -> None:
    parent = _run_python(
        tmp_path,
        """
        from supervisors import ProcessChild
        import sup_helpers
        child = ProcessChild.spawn(sup_helpers.sleep_forever)
        print(child.channel.recv()[1], flush=True)
        child.wait()
        """,
    )
    # sleep_forever never reads its channel, so only PR_SET_PDEATHSIG can end it.
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait(WAIT)
    try:
        wait_until(lambda: not _process_exists(child_pid))
    finally:
        if _process_exists(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def _process_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- scripts without a __main__ guard ------------------------------------------------------

# Top-level code, no `if __name__ == "__main__"` guard. Under multiprocessing's spawn, every
# child would run all of this again. The script adds the paths itself, so the children can
# only import supervisors and sup_helpers because they receive the parent's sys.path.
UNGUARDED = f"""
import os, signal, sys
sys.path[:0] = [{str(REPO)!r}, {str(HERE)!r}]
from supervisors import ChildSpec, ProcessChild, Supervisor, get_registry
import sup_helpers

print("TOP-LEVEL", os.getpid(), flush=True)
sup = Supervisor.start(
    "script", children=[ChildSpec("w", lambda: ProcessChild.spawn(sup_helpers.obedient), name="w")]
)
registry = get_registry(sup)
first = registry.wait_for("w", timeout=10)
pid1 = sup_helpers.ready_pid(first)
os.kill(pid1, signal.SIGKILL)
first.wait(10)
second = registry.wait_for("w", timeout=10)
pid2 = sup_helpers.ready_pid(second)
second.channel.send(("echo", "alive"))
reply = second.channel.recv()
sup.stop()
print("RESULT", pid1, pid2, reply, first.exitcode, flush=True)
"""


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def _run_python(tmp_path: Path, code: str) -> subprocess.Popen[str]:
    script = f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(HERE)!r}]\n" + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        text=True,
    )


def _check_unguarded_run(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("TOP-LEVEL") for line in lines) == 1, result.stdout
    (outcome,) = [line.split() for line in lines if line.startswith("RESULT")]
    _, pid1, pid2, reply, exitcode = outcome
    assert pid1 != pid2
    assert reply == "alive"
    assert exitcode == "-9"


def test_unguarded_script_file_supervises_process_children(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _check_unguarded_run(result)


def test_unguarded_code_from_python_dash_c_supervises_process_children(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", UNGUARDED],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _check_unguarded_run(result)


def test_unguarded_code_read_from_stdin_supervises_process_children(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-"],
        input=UNGUARDED,
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _check_unguarded_run(result)


def test_obedient_is_importable_by_name() -> None:
    # The process targets above must stay module-level functions of an importable module.
    assert obedient.__module__ == "sup_helpers"
