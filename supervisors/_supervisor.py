"""The `Supervisor` actor: OTP's supervisor behaviour on Pykka.

Children are an ordered list: started left to right, terminated right to left. Each child's
instance is watched by a `Monitor`, which tells the supervisor a `_ChildExit` carrying the
child's generation; a notice whose generation or state no longer matches (the supervisor
already terminated or restarted that instance itself) is stale and ignored. A restart that
fails marks the child ``restarting`` and the supervisor tells itself `_TryAgainRestart`, so
stop requests and queries are served between attempts; each attempt counts toward the
restart intensity.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import pykka
from pykka.messages import ProxyCall

from supervisors._actor import SupervisedActor
from supervisors._child import ChildRecord
from supervisors._errors import (
    ChildNotFoundError,
    ChildStateError,
    SupervisorConfigError,
    SupervisorError,
)
from supervisors._intensity import Clock, RestartHistory, add_restart
from supervisors._process import ProcessChild
from supervisors._reason import KILLED, REACHED_MAX_RESTART_INTENSITY, SHUTDOWN, is_normal_exit
from supervisors._registry import Registry
from supervisors._report import report_error, report_progress
from supervisors._shutdown import shutdown_instance
from supervisors._snapshot import ChildCounts, ChildInfo, TreeNode, merge_subtree
from supervisors._spec import (
    DEFAULT_INTENSITY,
    DEFAULT_PERIOD,
    DEFAULT_STRATEGY,
    DEFAULT_TREE_TIMEOUT,
    ChildSpec,
    SupervisorFlags,
    check_child_spec,
    check_child_specs,
    check_supervisor_flags,
    check_supervisor_name,
)
from supervisors._types import Handle
from supervisors._watch import Monitor

__all__ = ["Supervisor"]

# The registry of the supervisor whose thread is starting a child: a nested Supervisor.start
# without an explicit registry joins its parent's tree.
_starting_registry: ContextVar[Registry | None] = ContextVar(
    "supervisors_starting_registry", default=None
)


@dataclass(frozen=True)
class _ChildExit:
    child_id: str
    generation: int
    reason: object


@dataclass(frozen=True)
class _TryAgainRestart:
    child_id: str


class _Init:
    """The outcome of `on_start`, handed back to the thread calling `Supervisor.start`."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: Exception | None = None
        self.thread: threading.Thread | None = None


class Supervisor(SupervisedActor):
    """A Pykka actor that starts, watches, restarts and stops its children, as OTP's does.

    Start one with `Supervisor.start`. Its methods run in its own thread: call them through
    ``ref.proxy()`` (each returns a future) or the module-level helpers
    (`supervisors.which_children(ref)`, ...), which ask and wait.
    """

    @classmethod
    def start(
        cls,
        name: str,
        *,
        strategy: str = DEFAULT_STRATEGY,
        intensity: int = DEFAULT_INTENSITY,
        period: float = DEFAULT_PERIOD,
        children: list[ChildSpec] | tuple[ChildSpec, ...] = (),
        registry: Registry | None = None,
        clock: Clock | None = None,
    ) -> pykka.ActorRef[Self]:
        """Start a supervisor and its children, in order.

        Behind the call:

        1. the name, flags and child specs are validated; nothing starts if one is invalid;
        2. the actor starts; in its thread it binds `name` in the registry, then starts each
           child in order, binding named children;
        3. if a child's `start` raises, the children already started are stopped in reverse
           order, the supervisor stops, and this call raises that error.

        Args:
            name: the supervisor's name, in logs and snapshots; bound in the registry.
            strategy: ``one_for_one``, ``one_for_all``, ``rest_for_one`` or
                ``simple_one_for_one``.
            intensity: restarts allowed within `period`; one more and the supervisor stops
                its children and exits with ``"reached_max_restart_intensity"``.
            period: the restart window, in seconds.
            children: the child specs (under ``simple_one_for_one``, exactly one template).
            registry: where names are bound. None: the registry of the supervisor starting
                this one (so a nested tree shares its root's), else a new one.
            clock: monotonic seconds for the restart intensity; `time.monotonic` by default.

        Returns:
            The supervisor's ref, once every child has started.

        Raises:
            SupervisorConfigError: a flag or spec is invalid.
            AlreadyRegisteredError: `name` or a child's name is bound to a live instance.
            Exception: whatever a child's `start` raised.
        """
        checked_name = check_supervisor_name(name)
        flags = check_supervisor_flags(strategy, intensity, period)
        specs = check_child_specs(children, strategy=flags.strategy)
        if registry is None:
            registry = _starting_registry.get() or Registry()
        init = _Init()
        ref = super().start(
            name=checked_name,
            flags=flags,
            specs=specs,
            registry=registry,
            clock=clock or time.monotonic,
            init=init,
        )
        init.done.wait()
        if init.error is not None:
            if init.thread is not None:
                init.thread.join()
            raise init.error
        return ref

    def __init__(
        self,
        *,
        name: str,
        flags: SupervisorFlags,
        specs: tuple[ChildSpec, ...],
        registry: Registry,
        clock: Clock,
        init: _Init,
    ) -> None:
        """Create the actor; use `Supervisor.start` instead."""
        super().__init__()
        self.name = name
        """The supervisor's name."""
        self.flags = flags
        """Its strategy, intensity and period."""
        self.registry = registry
        """The tree's name registry (thread-safe; read it without the mailbox)."""
        self._specs = specs
        self._clock = clock
        self._init = init
        self._children: list[ChildRecord] = []
        self._started_at: float | None = None
        self._restarts: RestartHistory = ()
        self._dynamic_ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------------

    def on_start(self) -> None:
        """Bind the name and start the children in order (see `Supervisor.start`)."""
        self._init.thread = threading.current_thread()
        self._started_at = time.time()
        try:
            self.registry.bind(self.name, self.actor_ref)
            if self.flags.strategy != "simple_one_for_one":
                for spec in self._specs:
                    child = ChildRecord(spec, spec.id)
                    self._start_instance(child)
                    self._children.append(child)
        except Exception as exc:
            self._init.error = exc
            self._stop()
        finally:
            self._init.done.set()

    def on_stop(self) -> None:
        """Terminate the children in reverse order, then unbind the name."""
        self._shutdown_children()
        self.registry.unbind(self.name, self.actor_ref)

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Leave nothing running after the supervisor fails or gives up."""
        self.on_stop()

    def on_receive(self, message: Any) -> Any:
        """Handle death notices and retries; see the module docstring."""
        if isinstance(message, _ChildExit):
            self._on_child_exit(message)
        elif isinstance(message, _TryAgainRestart):
            child = self._find(message.child_id)
            if child is not None and child.state == "restarting":
                self._restart(child)
        else:
            super().on_receive(message)

    # -- public API (runs in the supervisor's thread) --------------------------------------

    def start_child(self, *args: Any) -> Handle:
        """Add and start a child.

        Under ``simple_one_for_one``, ``start_child(*extra_args)`` calls the template's
        ``start(*extra_args)`` and gives the child a generated id (``"<template id>-<n>"``);
        otherwise ``start_child(spec)`` appends `spec` to the children and starts it.

        Returns:
            The new instance.

        Raises:
            SupervisorConfigError: the spec is invalid, or its name is taken by a sibling.
            ChildStateError: a child with that id is already present.
            Exception: whatever the child's `start` raised; the child is not added.
        """
        if self.flags.strategy == "simple_one_for_one":
            template = self._specs[0]
            child = ChildRecord(template, f"{template.id}-{next(self._dynamic_ids)}", args=args)
        else:
            if len(args) != 1:
                msg = f"start_child takes one ChildSpec under {self.flags.strategy}"
                raise TypeError(msg)
            spec = check_child_spec(args[0])
            present = self._find(spec.id)
            if present is not None:
                msg = f"child {spec.id!r} is already present ({present.state})"
                raise ChildStateError(msg)
            if spec.name is not None and any(c.spec.name == spec.name for c in self._children):
                raise SupervisorConfigError("spec.name", f"duplicate name {spec.name!r}")
            child = ChildRecord(spec, spec.id)
        handle = self._start_instance(child)
        self._children.append(child)
        return handle

    def terminate_child(self, child: str | Handle) -> None:
        """Terminate a child (by id or instance) within its shutdown timeout.

        Its spec is kept, so `restart_child` can start it again, except for a temporary
        child or under ``simple_one_for_one``, where the child is removed.

        Raises:
            ChildNotFoundError: no such child.
        """
        found = self._get(child)
        self._terminate_instance(found)
        if found.spec.restart == "temporary" or self.flags.strategy == "simple_one_for_one":
            self._children.remove(found)

    def restart_child(self, child_id: str) -> Handle:
        """Start a terminated child again (not counted toward the restart intensity).

        Returns:
            The new instance.

        Raises:
            ChildNotFoundError: no such child.
            ChildStateError: the child is running or restarting.
            SupervisorError: under ``simple_one_for_one``.
            Exception: whatever the child's `start` raised; the child stays terminated.
        """
        found = self._get_static(child_id, "restart_child")
        if found.state != "terminated":
            msg = f"child {child_id!r} is {found.state}"
            raise ChildStateError(msg)
        return self._start_instance(found)

    def delete_child(self, child_id: str) -> None:
        """Forget a terminated child's spec.

        Raises:
            ChildNotFoundError: no such child.
            ChildStateError: the child is running or restarting.
            SupervisorError: under ``simple_one_for_one``.
        """
        found = self._get_static(child_id, "delete_child")
        if found.state != "terminated":
            msg = f"child {child_id!r} is {found.state}"
            raise ChildStateError(msg)
        self._children.remove(found)

    def which_children(self) -> list[ChildInfo]:
        """Return a snapshot of every child, in start order."""
        return [child.info() for child in self._children]

    def count_children(self) -> ChildCounts:
        """Count the children as OTP does (see `ChildCounts`)."""
        simple = self.flags.strategy == "simple_one_for_one"
        return ChildCounts.of(
            self.which_children(), template=self._specs[0].kind if simple else None
        )

    def tree(self, timeout: float = DEFAULT_TREE_TIMEOUT) -> TreeNode:
        """Return a JSON-serialisable snapshot of this supervisor and its whole subtree.

        Child supervisors are asked for their own tree, all at once, and given less time
        than this call so that their answers arrive within `timeout`; one that does not
        answer shows state ``unresponsive`` instead of holding up the snapshot.

        Args:
            timeout: seconds to wait for child supervisors.
        """
        deadline = time.monotonic() + timeout
        nodes: list[TreeNode] = []
        pending: list[tuple[TreeNode, pykka.Future[Any]]] = []
        for child in self._children:
            node = child.info().to_node()
            nodes.append(node)
            handle = child.handle
            if (
                child.state == "running"
                and isinstance(handle, pykka.ActorRef)
                and issubclass(handle.actor_class, Supervisor)
            ):
                call = ProxyCall(attr_path=("tree",), args=(), kwargs={"timeout": timeout * 0.8})
                pending.append((node, handle.ask(call, block=False)))
        for node, future in pending:
            merge_subtree(node, future, deadline)
        thread = self._init.thread
        return TreeNode(
            id=self.name,
            name=self.name,
            kind="supervisor",
            state="running",
            restart=None,
            restarts=0,
            pid=None,
            thread=thread.name if thread is not None else None,
            last_exit=None,
            started_at=self._started_at,
            strategy=self.flags.strategy,
            intensity=self.flags.intensity,
            period=self.flags.period,
            children=nodes,
        )

    # -- internals -------------------------------------------------------------------------

    def _find(self, child_id: str) -> ChildRecord | None:
        return next((child for child in self._children if child.id == child_id), None)

    def _get(self, key: str | Handle) -> ChildRecord:
        if isinstance(key, str):
            found = self._find(key)
        else:
            found = next((child for child in self._children if child.handle is key), None)
        if found is None:
            msg = f"supervisor {self.name!r} has no child {key!r}"
            raise ChildNotFoundError(msg)
        return found

    def _get_static(self, child_id: str, operation: str) -> ChildRecord:
        if self.flags.strategy == "simple_one_for_one":
            msg = f"{operation} is not supported under simple_one_for_one"
            raise SupervisorError(msg)
        return self._get(child_id)

    def _start_instance(self, child: ChildRecord) -> Handle:
        """Start one instance of `child`, watch it and bind its name; report a failure."""
        token = _starting_registry.set(self.registry)
        try:
            handle: object = child.spec.start(*child.args)
            if not isinstance(handle, pykka.ActorRef | ProcessChild):
                msg = (
                    f"start of child {child.id!r} returned {handle!r}, "
                    "expected a pykka.ActorRef or a ProcessChild"
                )
                raise TypeError(msg)
            child.generation += 1
            generation = child.generation
            monitor = Monitor(handle, lambda reason: self._notify_exit(child, generation, reason))
            if child.spec.name is not None:
                try:
                    self.registry.bind(child.spec.name, handle)
                except Exception:
                    monitor.cancel()
                    shutdown_instance(handle, monitor, child.spec.shutdown)
                    raise
        except Exception as exc:
            report_error(self.name, "start_error", exc, child.offender())
            raise
        finally:
            _starting_registry.reset(token)
        child.handle, child.monitor, child.state = handle, monitor, "running"
        child.started_at = time.time()
        report_progress(self.name, child.offender())
        return handle

    def _notify_exit(self, child: ChildRecord, generation: int, reason: object) -> None:
        # Runs on a watcher thread.
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor_ref.tell(_ChildExit(child.id, generation, reason))

    def _forget_instance(self, child: ChildRecord) -> None:
        handle = child.handle
        if handle is not None and child.spec.name is not None:
            self.registry.unbind(child.spec.name, handle)
        if isinstance(handle, ProcessChild):
            handle.close()
        child.handle = None
        child.monitor = None

    def _terminate_instance(self, child: ChildRecord) -> None:
        """Stop `child`'s instance, if any, and report a surprising exit reason."""
        handle, monitor = child.handle, child.monitor
        if handle is not None and monitor is not None:
            monitor.cancel()
            offender = child.offender()
            reason = shutdown_instance(handle, monitor, child.spec.shutdown)
            expected = is_normal_exit(reason) or (
                reason == KILLED and child.spec.shutdown == "brutal_kill"
            )
            if not expected:
                report_error(self.name, "shutdown_error", reason, offender)
            child.last_exit = SHUTDOWN if is_normal_exit(reason) else reason
        self._forget_instance(child)
        child.state = "terminated"

    def _shutdown_children(self) -> None:
        for child in reversed(self._children):
            self._terminate_instance(child)

    def _on_child_exit(self, message: _ChildExit) -> None:
        child = self._find(message.child_id)
        if child is None or child.generation != message.generation or child.state != "running":
            return  # stale: this instance was already terminated or replaced
        offender = child.offender()
        self._forget_instance(child)
        child.state = "terminated"
        child.last_exit = reason = message.reason
        restart = child.spec.restart
        if restart == "temporary" or (restart == "transient" and is_normal_exit(reason)):
            if not is_normal_exit(reason):
                report_error(self.name, "child_terminated", reason, offender)
            if restart == "temporary" or self.flags.strategy == "simple_one_for_one":
                self._children.remove(child)
            return
        report_error(self.name, "child_terminated", reason, offender)
        self._restart(child)

    def _restart(self, child: ChildRecord) -> None:
        """Restart `child` under the strategy, unless the restart intensity is exceeded."""
        flags = self.flags
        self._restarts, exceeded = add_restart(
            self._restarts, self._clock(), flags.intensity, flags.period
        )
        if exceeded:
            report_error(self.name, "shutdown", REACHED_MAX_RESTART_INTENSITY, child.offender())
            self._shutdown_children()
            self.exit(REACHED_MAX_RESTART_INTENSITY)
        if flags.strategy == "one_for_all":
            group = list(self._children)
        elif flags.strategy == "rest_for_one":
            group = self._children[self._children.index(child) :]
        else:
            group = [child]
        for sibling in reversed(group):
            if sibling is not child:
                self._terminate_instance(sibling)
                if sibling.spec.restart == "temporary":
                    self._children.remove(sibling)
        for member in group:
            if member is not child and member.spec.restart == "temporary":
                continue
            try:
                self._start_instance(member)
            except Exception:
                member.state = "restarting"
                self.actor_ref.tell(_TryAgainRestart(member.id))
                return
            member.restarts += 1
