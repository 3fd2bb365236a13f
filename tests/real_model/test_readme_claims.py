"""What README.md and bench/README.md state as facts about exactness and multi-turn chats.

Each test here asserts a sentence of the READMEs, so that the sentence cannot outlive
the behaviour:

- "an exact hit continues exactly as the cold run": past gemma-3's 512-token sliding
  window, greedy and seeded, on every tier.
- "stopping a generation and resuming it with `parent_key` gives the tokens of one
  uninterrupted run": asserted within the window, greedy and seeded, on every tier
  (`test_real_model.py`). Past the window it does not always hold, greedy included: a
  resume restores a row saved at the stop point, and past the window a restored state
  computes slightly otherwise than the live one (issue 12, item 4). Probes on
  gemma-3-270m: 3 of 9 greedy prompts of about 650 tokens diverged, after 2 to 11
  resumed tokens, alike on every tier. What is asserted past the window is that the
  tier never changes a resume; whether it equals one run is reported.
- "multi-turn: prompt tokens from the cache on turns 2+ >= 90%": a chat shaped like
  `bench.multi_turn` (a ~700-word shared context, short questions, the history resent)
  under the benchmark's policy, every turn after the first at 90% or more. The
  benchmark measures 98%; the margin covers replies that re-tokenize differently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import RealModel

pytestmark = pytest.mark.real_model

TIERS = ("ram", "ram_file", "disk")
SEEDED = {"temperature": 0.8, "seed": 1234}
# bench.multi_turn's policy: sys.yaml's default policy, saves aligned to 64 tokens.
MULTI_TURN_POLICY = {
    "min_tokens": 64,
    "cold_min_tokens": 64,
    "cold_max_tokens": 30000,
    "continued_interval": 512,
    "boundary_trim_tokens": 0,
    "boundary_align_tokens": 64,
    "session_resume_wait_ms": 500,
}


def _stop_and_resume(
    real: RealModel, kind: str, topic: str, sampling: dict[str, Any]
) -> tuple[list[int], list[int], list[int]]:
    """One uninterrupted run past the window, then the same stopped after 10 tokens (an
    exact hit) and resumed with its `parent_key` from the `kind` tier; returns the
    tokens of the three."""
    model = real.tier(kind)
    prompt = real.passage(topic, 60)
    whole = real.rt.complete(model, prompt, max_tokens=24, **sampling)
    assert whole.cache.kind == "cold"
    assert whole.usage.prompt_tokens > 600, "past the sliding window"
    assert len(whole.tokens) == 24, "the model stopped early; pick another prompt"
    real.rt.cache.wait_idle(30.0)
    first = real.rt.complete(model, prompt, max_tokens=10, **sampling)
    assert first.cache.kind == "exact"
    assert first.finish_key is not None
    real.rt.cache.wait_idle(30.0)
    hits = real.tier_hits(kind)
    resumed = real.rt.complete(
        model,
        real.tokens(prompt) + first.tokens,
        max_tokens=14,
        parent_key=first.finish_key,
        **sampling,
    )
    assert resumed.cache.kind == "parent"
    assert resumed.usage.cached_tokens >= first.usage.prompt_tokens + 9
    assert real.tier_hits(kind) == hits + 1, f"the resume did not come from the {kind} tier"
    return whole.tokens, first.tokens, resumed.tokens


@pytest.mark.parametrize("sampling", [{}, SEEDED], ids=["greedy", "seeded"])
def test_past_the_sliding_window_exact_hits_equal_cold_runs_and_no_tier_changes_a_resume(
    real: RealModel, sampling: dict[str, Any]
) -> None:
    topic = f"Resume past the window {'seeded' if sampling else 'greedy'}"
    runs = {kind: _stop_and_resume(real, kind, topic, sampling) for kind in TIERS}
    for kind, (whole, first, _resumed) in runs.items():
        assert first == whole[:10], f"{kind}: an exact hit continues the cold run"
    assert len({tuple(whole) for whole, _, _ in runs.values()}) == 1, "cold runs differ"
    # Whichever tier held the row, the resume restores the same bytes: the same tokens.
    resumes = {kind: resumed for kind, (_, _, resumed) in runs.items()}
    assert resumes["ram_file"] == resumes["disk"] == resumes["ram"], resumes
    whole, first, resumed = runs["ram"]
    agree = next(
        (i for i, (a, b) in enumerate(zip(first + resumed, whole, strict=True)) if a != b),
        len(whole),
    )
    real.report(
        f"{'seeded' if sampling else 'greedy'} resume past the window (every tier alike): "
        f"{'equal to one run' if agree == len(whole) else f'diverges at token {agree}'}"
    )


def test_a_multi_turn_chat_takes_90_percent_of_each_later_prompt_from_the_cache(
    real: RealModel,
) -> None:
    model = real._load("multi-turn", tier="ram", policy=MULTI_TURN_POLICY)
    context = real.passage("Town chronicle", 70)
    questions = [
        f"{context}\n\nQuestion: Which places does this text mention most often?",
        "Can you say more about that?",
        "Give one example from the text.",
        "Now answer in five words.",
    ]
    messages: list[dict[str, str]] = []
    shares: list[float] = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        result = real.rt.chat(model, messages, max_tokens=16)
        real.rt.cache.wait_idle(30.0)
        messages.append({"role": "assistant", "content": result.text})
        usage = result.usage
        shares.append(usage.cached_tokens / usage.prompt_tokens)
    real.report(
        "multi-turn chat (bench.multi_turn's shape and policy), cached share by turn: "
        + ", ".join(f"{s:.1%}" for s in shares)
    )
    assert shares[0] == 0.0
    assert all(s >= 0.9 for s in shares[1:]), shares
