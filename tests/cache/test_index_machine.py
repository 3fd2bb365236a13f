"""Stateful property test of the meta actor's state against a simple model.

Random saves (reserve, write, announce), saves left in flight, cancels, writer
deaths, expiries, claims, checkins, gc, pressure evictions and corrupt-row
removals. After every step the index's own `check()` must be clean, and the
model's invariants must hold: pinned rows are never evicted, no tier is over
quota, every available row is findable by exact key and by the trie.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from erllama_py.cache.actions import Demote, Drop
from erllama_py.cache.index import CacheIndex
from erllama_py.cache.key import Namespace, encode_tokens, make_key
from erllama_py.cache.rows import Announcement, Reservation, ReserveRequest
from erllama_py.config import TierSettings
from erllama_py.errors import PayloadTooLargeError, ReservationError, TierFullError

NS = Namespace(fingerprint=b"\x07" * 32, quant="f16", ctx_hash=b"\x08" * 16)
TIERS = ("ram", "disk:/nowhere")
QUOTAS = {"ram": 400, "disk:/nowhere": 900}
TOKEN_LISTS = [[1], [1, 2], [1, 2, 3], [1, 2, 4], [2], [2, 3], [3, 1, 2], [1, 2, 3, 4, 5]]

token_lists = st.sampled_from(TOKEN_LISTS)
tiers = st.sampled_from(TIERS)
sizes = st.integers(min_value=10, max_value=450)


class MetaStateMachine(RuleBasedStateMachine):
    @initialize(demote=st.booleans())
    def start(self, demote: bool) -> None:
        self.now = 0.0
        self.dead_writers: set[str] = set()
        self.index = CacheIndex(
            [TierSettings("ram", QUOTAS["ram"]), TierSettings("disk", 900, Path("/nowhere"))],
            demote_on_evict=demote,
            reservation_ttl_s=10.0,
            clock=lambda: self.now,
            writer_alive=lambda w: w not in self.dead_writers,
        )
        self.in_flight: list[Reservation] = []
        self.pins: dict[int, tuple[bytes, str]] = {}
        self.writer_ids = 0

    def _apply(self, actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, Drop | Demote):
                where = (action.row.key, action.row.tier)
                assert where not in self.pins.values(), "a pinned row was evicted"

    def _new_writer(self) -> str:
        self.writer_ids += 1
        return f"w{self.writer_ids}"

    @rule(tokens=token_lists, tier=tiers, size=sizes)
    def save(self, tokens: list[int], tier: str, size: int) -> None:
        key = make_key(NS, tokens)
        try:
            res, actions = self.index.reserve(
                ReserveRequest(
                    key,
                    tier,
                    namespace=NS,
                    tokens=encode_tokens(tokens),
                    size=size,
                    reason="finish",
                    writer=self._new_writer(),
                )
            )
        except PayloadTooLargeError:
            assert size > QUOTAS[tier]
            return
        except (TierFullError, ReservationError):
            return
        self._apply(list(actions))
        _, actions = self.index.announce(Announcement(key, res.tier, res.token, size=size))
        self._apply(list(actions))
        assert self.index.lookup_exact(key) is not None

    @rule(tokens=token_lists, tier=tiers, size=sizes)
    def start_save(self, tokens: list[int], tier: str, size: int) -> None:
        key = make_key(NS, tokens)
        try:
            res, actions = self.index.reserve(
                ReserveRequest(
                    key,
                    tier,
                    namespace=NS,
                    tokens=encode_tokens(tokens),
                    size=size,
                    reason="cold",
                    writer=self._new_writer(),
                )
            )
        except (PayloadTooLargeError, TierFullError, ReservationError):
            return
        self._apply(list(actions))
        self.in_flight.append(res)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def finish_save(self, data: st.DataObject) -> None:
        res = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        try:
            _, actions = self.index.announce(
                Announcement(res.key, res.tier, res.token, size=res.size)
            )
        except ReservationError:
            return  # expired meanwhile: the writer abandons
        self._apply(list(actions))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def cancel_save(self, data: st.DataObject) -> None:
        res = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        self.index.cancel(res.key, res.tier, res.token)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def kill_writer(self, data: st.DataObject) -> None:
        res = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        self.dead_writers.add(res.writer)
        self._apply(list(self.index.writer_down(res.writer)))
        assert (res.key, res.tier) not in {(r.key, r.tier) for r in self.index.reservations()}

    @rule(seconds=st.floats(min_value=0.5, max_value=15.0))
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds
        self._apply(list(self.index.expire_stale()))
        live = {(r.key, r.tier, r.token) for r in self.index.reservations()}
        self.in_flight = [r for r in self.in_flight if (r.key, r.tier, r.token) in live]

    @rule(tokens=token_lists, tier=st.none() | tiers)
    def claim(self, tokens: list[int], tier: str | None) -> None:
        claim = self.index.claim(make_key(NS, tokens), tier)
        if claim is not None:
            self.pins[claim.holder] = (claim.key, claim.tier)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def checkin(self, data: st.DataObject) -> None:
        holder = data.draw(st.sampled_from(sorted(self.pins)))
        del self.pins[holder]
        self.index.checkin(holder)

    @rule()
    def gc(self) -> None:
        self._apply(list(self.index.gc()))

    @rule(target_bytes=st.integers(0, 1000), tier=st.none() | tiers)
    def evict_bytes(self, target_bytes: int, tier: str | None) -> None:
        self._apply(list(self.index.evict_bytes(target_bytes, None if tier is None else [tier])))

    @rule(tokens=token_lists, tier=tiers)
    def remove_corrupt(self, tokens: list[int], tier: str) -> None:
        key = make_key(NS, tokens)
        self.index.remove(key, tier)
        self.pins = {h: w for h, w in self.pins.items() if w != (key, tier)}

    @invariant()
    def index_is_consistent(self) -> None:
        assert self.index.check() == []

    @invariant()
    def no_pinned_row_is_evicted(self) -> None:
        for key, tier in self.pins.values():
            row = self.index.row(key, tier)
            assert row is not None and row.refcount > 0

    @invariant()
    def tier_bytes_within_quota(self) -> None:
        for tier in TIERS:
            assert self.index.used_bytes(tier) <= QUOTAS[tier]

    @invariant()
    def every_available_row_is_findable(self) -> None:
        for info in self.index.rows():
            if info.status != "available":
                continue
            assert self.index.lookup_exact(info.key) is not None
            row = self.index.row(info.key, info.tier)
            assert row is not None
            hit = self.index.longest_prefix(NS, row.tokens)
            assert hit is not None and hit.covered is not None
            assert hit.covered.n_tokens == row.n_tokens


MetaStateMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestMetaStateMachine = MetaStateMachine.TestCase
