"""A stateful property test of a supervisor against an independent model of OTP's rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import pykka
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sup_helpers import WAIT, Crash, FakeClock, StopSelf, Worker, actor, wait_exit_processed

from supervisors import ChildSpec, Supervisor, restart_child, start_child, which_children
from supervisors._spec import RestartType

RESTART_TYPES: tuple[RestartType, ...] = get_args(RestartType)
picks = st.integers(min_value=0, max_value=8)
# Seconds on the fake clock: often exactly one period, where OTP's `now - t <= period` bites.
gaps = st.sampled_from([0.0, 1.0, 2.5, 5.0, 31.0])


@dataclass
class ModelChild:
    id: str
    restart: RestartType
    state: str = "running"
    restarts: int = 0


class SupervisorMachine(RuleBasedStateMachine):
    """Crashes and stops random children, moves a fake clock, and checks after each step
    which children were replaced and whether the supervisor gave up, as OTP would."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.sup: pykka.ActorRef[Any] | None = None
        self.strategy = "one_for_one"
        self.intensity = 0
        self.period = 1.0
        self.children: list[ModelChild] = []
        self.history: list[float] = []  # the model's own restart window
        self.alive = True
        self.refs: dict[str, Any] = {}

    # -- the model -----------------------------------------------------------------------

    def _group(self, dead: ModelChild) -> list[ModelChild]:
        if self.strategy == "one_for_all":
            return list(self.children)
        if self.strategy == "rest_for_one":
            return self.children[self.children.index(dead) :]
        return [dead]

    def _model_exit(self, dead: ModelChild, abnormal: bool) -> set[str]:
        """Apply one exit to the model; return the ids whose instance must be new."""
        dead.state = "terminated"
        if dead.restart == "temporary" or (dead.restart == "transient" and not abnormal):
            if dead.restart == "temporary" or self.strategy == "simple_one_for_one":
                self.children.remove(dead)
            return set()
        now = self.clock.now
        self.history = [t for t in self.history if now - t <= self.period]
        self.history.append(now)
        if len(self.history) > self.intensity:
            self.alive = False
            for model_child in self.children:
                model_child.state = "terminated"
            return set()
        replaced = set()
        for member in self._group(dead):
            if member is not dead and member.restart == "temporary":
                self.children.remove(member)
                continue
            member.state = "running"
            member.restarts += 1
            replaced.add(member.id)
        return replaced

    # -- rules -----------------------------------------------------------------------------

    @initialize(
        strategy=st.sampled_from(
            ["one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one"]
        ),
        restarts=st.lists(st.sampled_from(RESTART_TYPES), min_size=3, max_size=3),
        intensity=st.integers(min_value=0, max_value=3),
        period=st.sampled_from([1.0, 5.0]),
    )
    def start(
        self, strategy: str, restarts: list[RestartType], intensity: int, period: float
    ) -> None:
        self.strategy, self.intensity, self.period = strategy, intensity, period
        if strategy == "simple_one_for_one":
            template = ChildSpec("w", Worker.start, restart=restarts[0])
            self.sup = Supervisor.start(
                "machine",
                strategy=strategy,
                intensity=intensity,
                period=period,
                children=[template],
                clock=self.clock,
            )
            for _ in range(3):
                start_child(self.sup, timeout=WAIT)
            ids = ["w-1", "w-2", "w-3"]
            restarts = [restarts[0]] * 3
        else:
            ids = ["a", "b", "c"]
            specs = [
                ChildSpec(i, Worker.start, restart=r) for i, r in zip(ids, restarts, strict=True)
            ]
            self.sup = Supervisor.start(
                "machine",
                strategy=strategy,
                intensity=intensity,
                period=period,
                children=specs,
                clock=self.clock,
            )
        self.children = [ModelChild(i, r) for i, r in zip(ids, restarts, strict=True)]
        self.refs = {c.id: c.handle for c in which_children(self.sup, timeout=WAIT)}

    def _running(self) -> list[ModelChild]:
        return [c for c in self.children if c.state == "running"]

    def _exit(self, pick: int, abnormal: bool) -> None:
        assert self.sup is not None
        running = self._running()
        dead = running[pick % len(running)]
        old = self.refs[dead.id]
        old.tell(Crash() if abnormal else StopSelf())
        old.actor_stopped.wait(WAIT)
        wait_exit_processed(self.sup, dead.id, old)
        replaced = self._model_exit(dead, abnormal)
        self._check(replaced)

    @precondition(lambda self: self.alive and bool(self._running()))
    @rule(pick=picks, after=gaps)
    def crash_child(self, pick: int, after: float) -> None:
        self.clock.advance(after)
        self._exit(pick, abnormal=True)

    @precondition(lambda self: self.alive and bool(self._running()))
    @rule(pick=picks, after=gaps)
    def stop_child(self, pick: int, after: float) -> None:
        self.clock.advance(after)
        self._exit(pick, abnormal=False)

    @precondition(
        lambda self: (
            self.alive
            and self.strategy != "simple_one_for_one"
            and any(c.state == "terminated" for c in self.children)
        )
    )
    @rule(pick=picks)
    def restart_terminated_child(self, pick: int) -> None:
        assert self.sup is not None
        terminated = [c for c in self.children if c.state == "terminated"]
        target = terminated[pick % len(terminated)]
        restart_child(self.sup, target.id, timeout=WAIT)
        target.state = "running"  # a manual restart counts toward neither intensity nor restarts
        self._check({target.id})

    @rule(seconds=gaps)
    def advance_time(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # -- checks ----------------------------------------------------------------------------

    def _check(self, replaced: set[str]) -> None:
        assert self.sup is not None
        if not self.alive:
            # Giving up happens within the handling of the exit, which is over by now.
            assert not self.sup.is_alive()
            assert all(not ref.is_alive() for ref in self.refs.values() if ref is not None)
            return
        actual = which_children(self.sup, timeout=WAIT)
        assert [c.id for c in actual] == [c.id for c in self.children]
        for info, model in zip(actual, self.children, strict=True):
            assert info.state == model.state, info.id
            assert info.restarts == model.restarts, info.id
            if model.state == "running":
                assert (info.handle is not self.refs[info.id]) == (info.id in replaced), info.id
                assert actor(info.handle).is_alive()
            else:
                assert info.handle is None
            self.refs[info.id] = info.handle

    @invariant()
    def supervisor_is_alive_exactly_while_the_model_says_so(self) -> None:
        if self.sup is not None:
            assert self.sup.is_alive() == self.alive

    def teardown(self) -> None:
        if self.sup is not None and self.sup.is_alive():
            self.sup.stop(timeout=WAIT)


SupervisorMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_supervisor_follows_otp_restart_rules = SupervisorMachine.TestCase
