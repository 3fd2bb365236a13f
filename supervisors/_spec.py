"""Child specs, supervisor flags, their defaults and their validation.

Validation follows OTP's supervisor: one small function per field, each failing with a
`SupervisorConfigError` that names the field path and quotes the value. A `ChildSpec` is a
plain record and is not checked when built; `check_child_specs` and `check_supervisor_flags`
check without starting anything, and `Supervisor.start` calls them before it starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, TypeGuard, cast, get_args

from supervisors._errors import SupervisorConfigError

if TYPE_CHECKING:
    from supervisors._types import Handle

__all__ = [
    "Strategy",
    "RestartType",
    "Kind",
    "Shutdown",
    "DEFAULT_STRATEGY",
    "DEFAULT_INTENSITY",
    "DEFAULT_PERIOD",
    "DEFAULT_RESTART",
    "DEFAULT_KIND",
    "DEFAULT_WORKER_SHUTDOWN",
    "DEFAULT_SUPERVISOR_SHUTDOWN",
    "DEFAULT_TREE_TIMEOUT",
    "ChildSpec",
    "SupervisorFlags",
    "check_child_spec",
    "check_child_specs",
    "check_supervisor_flags",
    "check_supervisor_name",
]

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]
Kind = Literal["worker", "supervisor"]
Shutdown = float | Literal["brutal_kill", "infinity"]

# Defaults, declared once. OTP's are one_for_one, 1 restart in 5 s; ours follow erllama's tree.
DEFAULT_STRATEGY: Final[Strategy] = "one_for_one"
DEFAULT_INTENSITY: Final = 5  # restarts allowed within DEFAULT_PERIOD
DEFAULT_PERIOD: Final = 30.0  # seconds
DEFAULT_RESTART: Final[RestartType] = "permanent"
DEFAULT_KIND: Final[Kind] = "worker"
DEFAULT_WORKER_SHUTDOWN: Final[Shutdown] = 5.0  # seconds to stop gracefully before a kill
DEFAULT_SUPERVISOR_SHUTDOWN: Final[Shutdown] = "infinity"  # a supervisor stops its own subtree
DEFAULT_TREE_TIMEOUT: Final = 2.0  # seconds a tree() snapshot waits for child supervisors

_STRATEGIES: Final = get_args(Strategy)
_RESTART_TYPES: Final = get_args(RestartType)
_KINDS: Final = get_args(Kind)


@dataclass(frozen=True)
class ChildSpec:
    """How a supervisor starts, restarts and stops one child.

    Attributes:
        id: the child's id, unique among its siblings.
        start: a callable returning a `pykka.ActorRef` or a `ProcessChild`. Zero arguments,
            except under ``simple_one_for_one`` where it receives `start_child`'s arguments.
        restart: ``permanent`` (always restarted), ``transient`` (restarted after an abnormal
            exit) or ``temporary`` (never restarted, forgotten when it ends).
        shutdown: seconds to wait for a graceful stop before killing, ``"brutal_kill"`` or
            ``"infinity"``. None (the default) means 5.0 for a worker and ``"infinity"`` for a
            supervisor; it is resolved when the spec is built.
        kind: ``worker`` or ``supervisor``.
        name: a registry name bound to the child's current instance; it survives restarts.
    """

    id: str
    start: Callable[..., Handle]
    restart: RestartType = DEFAULT_RESTART
    shutdown: Shutdown | None = None
    kind: Kind = DEFAULT_KIND
    name: str | None = None

    def __post_init__(self) -> None:
        if self.shutdown is None:
            default = (
                DEFAULT_SUPERVISOR_SHUTDOWN
                if self.kind == "supervisor"
                else DEFAULT_WORKER_SHUTDOWN
            )
            object.__setattr__(self, "shutdown", default)


@dataclass(frozen=True)
class SupervisorFlags:
    """A supervisor's strategy and restart intensity (validated).

    Attributes:
        strategy: how a death affects the siblings.
        intensity: restarts allowed within `period`; one more and the supervisor gives up.
        period: the length of the sliding window, in seconds.
    """

    strategy: Strategy = DEFAULT_STRATEGY
    intensity: int = DEFAULT_INTENSITY
    period: float = DEFAULT_PERIOD


def _fail(key: str, reason: str) -> SupervisorConfigError:
    return SupervisorConfigError(key, reason)


def _one_of(choices: tuple[str, ...], value: object) -> str:
    return f"must be one of {', '.join(choices)}, got {value!r}"


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_id(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(key, f"must be a non-empty string, got {value!r}")
    return value


def _check_start(value: object, key: str) -> None:
    if not callable(value):
        raise _fail(key, f"must be callable, got {value!r}")


def _check_restart(value: object, key: str) -> None:
    if value not in _RESTART_TYPES:
        raise _fail(key, _one_of(_RESTART_TYPES, value))


def _check_shutdown(value: object, key: str) -> None:
    if value in ("brutal_kill", "infinity"):
        return
    if not _is_number(value) or not 0 < value < math.inf:
        raise _fail(
            key, f"must be a positive number of seconds, 'brutal_kill' or 'infinity', got {value!r}"
        )


def _check_kind(value: object, key: str) -> None:
    if value not in _KINDS:
        raise _fail(key, _one_of(_KINDS, value))


def _check_name(value: object, key: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise _fail(key, f"must be None or a non-empty string, got {value!r}")
    return value


def check_child_spec(spec: object, key: str = "spec") -> ChildSpec:
    """Check one child spec, field by field.

    Args:
        spec: the value to check.
        key: the path naming it in errors.

    Returns:
        The spec, known to be valid.

    Raises:
        SupervisorConfigError: naming the first invalid field and quoting its value.
    """
    if not isinstance(spec, ChildSpec):
        raise _fail(key, f"must be a ChildSpec, got {spec!r}")
    _check_id(spec.id, f"{key}.id")
    _check_start(spec.start, f"{key}.start")
    _check_restart(spec.restart, f"{key}.restart")
    _check_kind(spec.kind, f"{key}.kind")
    _check_shutdown(spec.shutdown, f"{key}.shutdown")
    _check_name(spec.name, f"{key}.name")
    return spec


def check_child_specs(
    children: object, *, strategy: Strategy = DEFAULT_STRATEGY, key: str = "children"
) -> tuple[ChildSpec, ...]:
    """Check a supervisor's child specs without starting anything (OTP's check_childspecs).

    Args:
        children: a list or tuple of `ChildSpec`.
        strategy: the supervisor's strategy; ``simple_one_for_one`` takes exactly one spec,
            the template of its dynamic children, which must not have a name.
        key: the path naming the list in errors.

    Returns:
        The specs as a tuple.

    Raises:
        SupervisorConfigError: naming the first invalid field, e.g.
            ``children[2].restart: must be one of permanent, transient, temporary,
            got 'sometimes'``, or a duplicate id or name.
    """
    if not isinstance(children, list | tuple):
        raise _fail(key, f"must be a list of ChildSpec, got {children!r}")
    ids: set[str] = set()
    names: set[str] = set()
    for index, spec in enumerate(children):
        item = f"{key}[{index}]"
        check_child_spec(spec, item)
        if spec.id in ids:
            raise _fail(f"{item}.id", f"duplicate child id {spec.id!r}")
        ids.add(spec.id)
        if spec.name is not None:
            if spec.name in names:
                raise _fail(f"{item}.name", f"duplicate name {spec.name!r}")
            names.add(spec.name)
    if strategy == "simple_one_for_one":
        if len(children) != 1:
            raise _fail(
                key,
                "simple_one_for_one needs exactly one child spec (the template), "
                f"got {len(children)}",
            )
        if children[0].name is not None:
            raise _fail(
                f"{key}[0].name",
                "must be None under simple_one_for_one (its dynamic children share the "
                f"template), got {children[0].name!r}",
            )
    return tuple(children)


def _check_strategy(value: object, key: str) -> Strategy:
    if value not in _STRATEGIES:
        raise _fail(key, _one_of(_STRATEGIES, value))
    return cast("Strategy", value)


def _check_intensity(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _fail(key, f"must be a non-negative integer, got {value!r}")
    return value


def _check_period(value: object, key: str) -> float:
    if not _is_number(value) or not 0 < value < math.inf:
        raise _fail(key, f"must be a positive number of seconds, got {value!r}")
    return float(value)


def check_supervisor_flags(
    strategy: object = DEFAULT_STRATEGY,
    intensity: object = DEFAULT_INTENSITY,
    period: object = DEFAULT_PERIOD,
) -> SupervisorFlags:
    """Check a supervisor's flags without starting anything.

    Returns:
        The flags, with `period` as a float.

    Raises:
        SupervisorConfigError: naming the invalid flag (``strategy``, ``intensity`` or
            ``period``) and quoting its value.
    """
    return SupervisorFlags(
        strategy=_check_strategy(strategy, "strategy"),
        intensity=_check_intensity(intensity, "intensity"),
        period=_check_period(period, "period"),
    )


def check_supervisor_name(name: object, key: str = "name") -> str:
    """Check a supervisor's name: a non-empty string, also its registry name."""
    return _check_id(name, key)
