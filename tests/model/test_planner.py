"""Tick planning: budgets, save boundaries and deterministic chunks, without a model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from erllama_py.model.planner import plan_tick, prefill_limit
from erllama_py.model.protocol import GenerateOp, Prefill
from erllama_py.model.request import Request, RequestState, TokenPrompt
from erllama_py.params import RequestOptions


def _request(
    seq: int,
    cursor: int = 0,
    context: int = 0,
    *,
    sampler: int | None = 1,
    pending: int | None = None,
    cold_save_at: int | None = None,
    end_save_at: int | None = None,
    prefill_only: bool = False,
) -> RequestState:
    prompt = tuple(range(context + cursor))
    request = Request(TokenPrompt(prompt), RequestOptions(), prefill_only=prefill_only)
    r = RequestState(request, prompt=list(prompt))
    r.seq = seq
    r.sampler = sampler
    r.context = list(range(context))
    r.cursor = list(range(context, context + cursor))
    r.has_logits = context > 0 or cursor == 0
    r.pending = pending
    r.cold_save_at = cold_save_at
    r.end_save_at = end_save_at
    return r


def test_generating_requests_come_first_and_prefills_share_the_rest() -> None:
    gen = _request(0, context=10, pending=7)
    first = _request(1, cursor=100)
    second = _request(2, cursor=100)
    plan = plan_tick([first, gen, second], n_batch=128, chunk=512)
    assert [type(p.op) for p in plan] == [GenerateOp, Prefill, Prefill]
    assert plan[0].op == GenerateOp(0, 1, 7)
    assert [p.n for p in plan[1:]] == [100, 27]


def test_a_generate_without_a_pending_token_costs_no_batch_slot() -> None:
    gen = _request(0, context=10, pending=None)
    pre = _request(1, cursor=64)
    plan = plan_tick([gen, pre], n_batch=64, chunk=64)
    assert [p.n for p in plan] == [1, 64]


def test_a_prefill_slice_stops_at_the_cold_save_point() -> None:
    r = _request(0, cursor=300, cold_save_at=256)
    assert prefill_limit(r, 512, deterministic=False) == 256
    r.context, r.cursor = r.cursor[:256], r.cursor[256:]
    r.cold_save_at = None
    assert prefill_limit(r, 512, deterministic=False) == 44


def test_deterministic_mode_prefills_alone_in_n_batch_aligned_chunks() -> None:
    gen = _request(0, context=5, pending=3)
    pre = _request(1, cursor=200, context=100)
    plan = plan_tick([gen, pre], n_batch=64, chunk=64, deterministic=True)
    assert len(plan) == 1
    assert plan[0].request is pre
    assert plan[0].n == 28  # up to position 128, the next multiple of n_batch


def test_finishing_requests_and_prefill_only_requests_do_not_generate() -> None:
    done = _request(0, context=5)
    done.finishing = True
    warm = _request(1, context=5, prefill_only=True)
    assert plan_tick([done, warm], n_batch=64, chunk=64) == []


@given(
    cursors=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    n_batch=st.integers(8, 256),
    chunk=st.integers(1, 256),
    deterministic=st.booleans(),
)
def test_a_tick_never_exceeds_n_batch_tokens(
    cursors: list[int], n_batch: int, chunk: int, deterministic: bool
) -> None:
    requests = [
        _request(i, cursor=c, context=0 if c else 3, pending=None if c else i)
        for i, c in enumerate(cursors)
    ]
    plan = plan_tick(requests, n_batch=n_batch, chunk=chunk, deterministic=deterministic)
    tokens = sum(p.n for p in plan if isinstance(p.op, Prefill))
    tokens += sum(1 for p in plan if isinstance(p.op, GenerateOp) and p.op.pending is not None)
    assert tokens <= n_batch
    assert len({p.request.seq for p in plan}) == len(plan)
    if any(cursors):
        assert any(isinstance(p.op, Prefill) for p in plan)
    if deterministic:
        for p in plan:
            if isinstance(p.op, Prefill):
                assert (len(p.request.context) + p.n) % n_batch == 0 or p.n == len(p.request.cursor)
