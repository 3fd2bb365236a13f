"""Planning one scheduler tick: which sequences decode and how much each prefills.

Pure functions over the requests' progress, so the batching rules are tested
without a model:

- every decode-ready request generates: its pending token (sampled last
  tick) is decoded and its next token sampled; prefills share the rest of the
  ``n_batch`` budget, oldest request first, at most ``chunk`` tokens each;
- a prefill slice never crosses a pending save point (the cold boundary or
  the prompt's end), so the state at that point can be packed exactly;
- in deterministic mode a prefill runs alone in its step, in slices that end
  at multiples of ``n_batch`` (the chunks a cold run of the same prompt
  uses), because llama.cpp's numerics depend on what shares a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from erllama_py.model.protocol import GenerateOp, Prefill, SamplerSpec, StepOp
from erllama_py.model.request import RequestState

__all__ = ["Planned", "plan_tick", "prefill_limit"]


@dataclass(frozen=True)
class Planned:
    """One op of a tick and the request it serves (``n`` tokens for a prefill)."""

    request: RequestState
    op: StepOp
    n: int


def prefill_limit(request: RequestState, n_batch: int, deterministic: bool) -> int:
    """The most tokens `request` may prefill in its next slice (before budgets)."""
    limit = len(request.cursor)
    pos = len(request.context)
    for boundary in (request.cold_save_at, request.end_save_at):
        if boundary is not None and boundary > pos:
            limit = min(limit, boundary - pos)
    if deterministic:
        limit = min(limit, n_batch - pos % n_batch)
    return limit


def plan_tick(
    requests: Sequence[RequestState], n_batch: int, chunk: int, *, deterministic: bool = False
) -> list[Planned]:
    """The ops of the next tick, decodes first, then prefills, at most `n_batch` tokens.

    `requests` are in admission order; finishing requests take no part.
    """
    active = [r for r in requests if not r.finishing and r.seq is not None]
    if deterministic:
        for r in active:
            if r.cursor:
                n = prefill_limit(r, n_batch, True)
                assert r.seq is not None
                return [Planned(r, Prefill(r.seq, r.cursor[:n]), n)]
    planned: list[Planned] = []
    budget = n_batch
    for r in active:
        if r.decode_ready and not r.prefill_only:
            sampler: int | SamplerSpec | None = (
                r.sampler if r.sampler is not None else r.sampler_spec
            )
            if sampler is None:
                continue
            assert r.seq is not None
            planned.append(
                Planned(r, GenerateOp(r.seq, sampler, r.pending, r.request.options.logprobs), 1)
            )
            budget -= r.pending is not None
    for r in active:
        if budget <= 0:
            break
        if not r.cursor:
            continue
        n = min(prefill_limit(r, n_batch, False), budget, chunk)
        if n <= 0:
            continue
        assert r.seq is not None
        planned.append(Planned(r, Prefill(r.seq, r.cursor[:n]), n))
        budget -= n
    return planned
