"""Child specs, supervisor flags, defaults and validation (supervisors/_spec.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from sup_helpers import Worker, worker_spec

from supervisors import (
    ChildSpec,
    Supervisor,
    SupervisorConfigError,
    SupervisorFlags,
    check_child_specs,
    check_supervisor_flags,
)
from supervisors._spec import (
    DEFAULT_INTENSITY,
    DEFAULT_PERIOD,
    DEFAULT_STRATEGY,
    DEFAULT_WORKER_SHUTDOWN,
)


def _start() -> Any:
    return Worker.start()


def test_worker_shutdown_defaults_to_five_seconds_and_supervisor_to_infinity() -> None:
    assert ChildSpec("w", _start).shutdown == DEFAULT_WORKER_SHUTDOWN == 5.0
    assert ChildSpec("s", _start, kind="supervisor").shutdown == "infinity"
    assert ChildSpec("s", _start, kind="supervisor", shutdown=2.0).shutdown == 2.0


def test_child_spec_defaults_are_permanent_worker_without_name() -> None:
    spec = ChildSpec("w", _start)
    assert (spec.restart, spec.kind, spec.name) == ("permanent", "worker", None)


def test_supervisor_flags_default_to_one_for_one_five_restarts_in_thirty_seconds() -> None:
    assert check_supervisor_flags() == SupervisorFlags(DEFAULT_STRATEGY, 5, 30.0)
    assert (DEFAULT_INTENSITY, DEFAULT_PERIOD) == (5, 30.0)


def test_child_spec_is_frozen() -> None:
    spec = ChildSpec("w", _start)
    with pytest.raises(AttributeError):
        spec.id = "other"  # type: ignore[misc]


BAD_SPECS = [
    pytest.param(
        {"restart": "sometimes"},
        "children[2].restart",
        "must be one of permanent, transient, temporary, got 'sometimes'",
        id="restart",
    ),
    pytest.param(
        {"kind": "manager"},
        "children[2].kind",
        "must be one of worker, supervisor, got 'manager'",
        id="kind",
    ),
    pytest.param(
        {"shutdown": -1},
        "children[2].shutdown",
        "must be a positive number of seconds, 'brutal_kill' or 'infinity', got -1",
        id="negative-shutdown",
    ),
    pytest.param(
        {"shutdown": 0}, "children[2].shutdown", "got 0", id="zero-shutdown"
    ),  # OTP: use brutal_kill
    pytest.param({"shutdown": math.inf}, "children[2].shutdown", "got inf", id="inf-shutdown"),
    pytest.param({"shutdown": True}, "children[2].shutdown", "got True", id="bool-shutdown"),
    pytest.param({"shutdown": "never"}, "children[2].shutdown", "got 'never'", id="word-shutdown"),
    pytest.param({"id": ""}, "children[2].id", "must be a non-empty string, got ''", id="empty-id"),
    pytest.param({"id": 7}, "children[2].id", "must be a non-empty string, got 7", id="int-id"),
    pytest.param({"start": "Worker.start"}, "children[2].start", "must be callable", id="start"),
    pytest.param({"name": ""}, "children[2].name", "got ''", id="empty-name"),
]


@pytest.mark.parametrize(("override", "key", "message"), BAD_SPECS)
def test_invalid_child_spec_field_is_named_by_its_path_and_quoted(
    override: dict[str, Any], key: str, message: str
) -> None:
    fields: dict[str, Any] = {"id": "c", "start": _start, **override}
    children = [worker_spec("a"), worker_spec("b"), ChildSpec(**fields)]
    with pytest.raises(SupervisorConfigError) as raised:
        check_child_specs(children)
    assert raised.value.key == key
    assert message in raised.value.reason
    assert str(raised.value) == f"{key}: {raised.value.reason}"


def test_config_error_is_a_value_error() -> None:
    assert issubclass(SupervisorConfigError, ValueError)


def test_duplicate_child_id_is_rejected() -> None:
    with pytest.raises(SupervisorConfigError) as raised:
        check_child_specs([worker_spec("a"), worker_spec("b"), worker_spec("a")])
    assert raised.value.key == "children[2].id"
    assert raised.value.reason == "duplicate child id 'a'"


def test_duplicate_child_name_is_rejected() -> None:
    with pytest.raises(SupervisorConfigError) as raised:
        check_child_specs([worker_spec("a", name="n"), worker_spec("b", name="n")])
    assert (raised.value.key, raised.value.reason) == ("children[1].name", "duplicate name 'n'")


def test_children_that_are_not_a_list_are_rejected() -> None:
    with pytest.raises(SupervisorConfigError) as raised:
        check_child_specs(42)
    assert raised.value.key == "children"
    assert "got 42" in raised.value.reason


def test_child_that_is_not_a_child_spec_is_rejected() -> None:
    with pytest.raises(SupervisorConfigError) as raised:
        check_child_specs([worker_spec("a"), {"id": "b"}])
    assert raised.value.key == "children[1]"
    assert raised.value.reason == "must be a ChildSpec, got {'id': 'b'}"


def test_simple_one_for_one_takes_exactly_one_template() -> None:
    with pytest.raises(SupervisorConfigError) as raised:
        check_child_specs([worker_spec("a"), worker_spec("b")], strategy="simple_one_for_one")
    assert raised.value.key == "children"
    assert "exactly one child spec" in raised.value.reason
    assert "got 2" in raised.value.reason


def test_simple_one_for_one_template_cannot_have_a_name() -> None:
    with pytest.raises(SupervisorConfigError) as raised:
        check_child_specs([worker_spec("a", name="x")], strategy="simple_one_for_one")
    assert raised.value.key == "children[0].name"
    assert "got 'x'" in raised.value.reason


def test_valid_specs_are_returned_as_a_tuple_and_nothing_is_started() -> None:
    started: list[str] = []

    def start() -> Any:
        started.append("a")
        return Worker.start()

    spec = ChildSpec("a", start)
    assert check_child_specs([spec]) == (spec,)
    assert started == []


BAD_FLAGS = [
    pytest.param(
        {"strategy": "one_for_some"},
        "strategy",
        "must be one of one_for_one, one_for_all, rest_for_one, simple_one_for_one, "
        "got 'one_for_some'",
        id="strategy",
    ),
    pytest.param(
        {"intensity": -1}, "intensity", "must be a non-negative integer, got -1", id="intensity"
    ),
    pytest.param({"intensity": 1.5}, "intensity", "got 1.5", id="float-intensity"),
    pytest.param({"intensity": True}, "intensity", "got True", id="bool-intensity"),
    pytest.param({"period": 0}, "period", "must be a positive number of seconds, got 0", id="zero"),
    pytest.param({"period": "5s"}, "period", "got '5s'", id="string-period"),
]


@pytest.mark.parametrize(("flags", "key", "message"), BAD_FLAGS)
def test_invalid_supervisor_flag_is_named_and_quoted(
    flags: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(SupervisorConfigError) as raised:
        check_supervisor_flags(**flags)
    assert raised.value.key == key
    assert message in raised.value.reason


@pytest.mark.parametrize(("flags", "key", "message"), BAD_FLAGS)
def test_supervisor_with_invalid_flags_fails_to_start_and_leaves_nothing_running(
    flags: dict[str, Any], key: str, message: str, new_actors: Callable[[], list[Any]]
) -> None:
    started: list[object] = []

    def start() -> Any:
        ref = Worker.start()
        started.append(ref)
        return ref

    with pytest.raises(SupervisorConfigError) as raised:
        Supervisor.start("sup", children=[ChildSpec("a", start)], **flags)
    assert raised.value.key == key
    assert message in raised.value.reason
    assert started == []
    assert new_actors() == []


def test_supervisor_with_an_invalid_child_spec_fails_to_start(
    new_actors: Callable[[], list[Any]],
) -> None:
    with pytest.raises(SupervisorConfigError) as raised:
        Supervisor.start("sup", children=[worker_spec("a"), worker_spec("b", restart="always")])
    assert raised.value.key == "children[1].restart"
    assert new_actors() == []


def test_supervisor_name_must_be_a_non_empty_string() -> None:
    with pytest.raises(SupervisorConfigError) as raised:
        Supervisor.start("")
    assert raised.value.key == "name"
