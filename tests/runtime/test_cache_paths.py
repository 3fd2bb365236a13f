"""The cache through the public API: exact, parent, prefix and cold admissions, the save
reasons, the counters, and exactness (stop-and-resume, exact hits, deterministic mode).

Exactness is checked against a cold reference: the same model file loaded under another
cache namespace with saves off, so each of its requests is a cold run (same context
parameters, so the same numerics).
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from erllama_py import CacheHit, CounterSnapshot
from erllama_py.model.client import WorkerClient
from erllama_py.model.testmodel import DEFAULT_WORDS

TIERS = ("ram", "ram_file", "disk")
SAMPLINGS = {
    "greedy": {},
    "seeded": {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 1234},
}
TINY_WORDS = ("the", "cat", "dog", "red", "sky", "sun", "moon", "tree", "blue", "warm", "cold")


def counters_delta(before: CounterSnapshot, after: CounterSnapshot) -> CounterSnapshot:
    return after.since(before)


def rows_by_reason(rt, reason: str) -> list[dict[str, Any]]:
    rt.cache.wait_idle()
    return [r for r in rt.cache_rows() if r.reason == reason and r.status == "available"]


def in_thread(fn, *args: Any, **kwargs: Any) -> Future[Any]:
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


# --------------------------------------------------------------------------- admissions


def test_a_repeated_prompt_is_an_exact_hit_with_identical_output(model):
    rt = model.rt
    prompt = model.tokens("the cat and the dog saw the moon")
    before = rt.counters()
    cold = model.complete(prompt, max_tokens=8)
    assert cold.cache == CacheHit("cold", 0)
    assert cold.usage.cached_tokens == 0
    rt.cache.wait_idle()
    hit = model.complete(prompt, max_tokens=8)
    assert hit.cache == CacheHit("exact", len(prompt))
    assert hit.usage.cached_tokens == len(prompt)
    assert hit.tokens == cold.tokens
    assert hit.text == cold.text
    assert rt.last_cache_hit(model.name) == CacheHit("exact", len(prompt))
    delta = counters_delta(before, rt.counters())
    assert delta.misses == 1
    assert delta.hits_exact == 1


def test_parent_key_resumes_from_the_finish_save(model):
    rt = model.rt
    prompt = model.tokens("red green blue sky and the sun")
    first = model.complete(prompt, max_tokens=6)
    assert first.finish_reason == "length"
    before = rt.counters()
    follow = [*prompt, *first.tokens, *model.tokens("yes no", add_special=False)]
    second = model.complete(follow, max_tokens=4, parent_key=first.finish_key)
    # The last generated token was sampled but never decoded: the row ends before it.
    restored = len(prompt) + len(first.tokens) - 1
    assert second.cache == CacheHit("parent", restored)
    assert second.usage.cached_tokens == restored
    assert counters_delta(before, rt.counters()).hits_resume == 1


def test_a_longer_prompt_gets_a_prefix_hit_through_the_trie(model):
    rt = model.rt
    base = model.tokens("one two three and the tree")
    model.complete(base, max_tokens=3)
    rt.cache.wait_idle()
    before = rt.counters()
    longer = [*base, *model.tokens("was warm", add_special=False)]
    result = model.complete(longer, max_tokens=3)
    assert result.cache == CacheHit("prefix", len(base))
    assert result.usage.cached_tokens == len(base)
    delta = counters_delta(before, rt.counters())
    assert delta.hits_prefix == 1
    assert delta.misses == 0


def test_a_row_longer_than_the_shared_prefix_is_cut_back_to_it(model, load):
    rt = model.rt
    base = model.tokens("the moon and the sun and the sky was blue")
    model.complete(base, max_tokens=2)
    rt.cache.wait_idle()
    shared = len(base) - 4
    diverging = [*base[:shared], *model.tokens("dog cat", add_special=False)]
    result = model.complete(diverging, max_tokens=5)
    assert result.cache == CacheHit("prefix", shared)
    if model.kind == "stub":  # the stub's tokens depend on the context only
        reference = load(rt, "stub", "ref", reference=True)
        assert result.tokens == reference.complete(diverging, max_tokens=5).tokens


def test_an_unrelated_prompt_is_a_cold_miss(model):
    rt = model.rt
    model.complete("the cat and the dog", max_tokens=2)
    rt.cache.wait_idle()
    before = rt.counters()
    result = model.complete("yes no answer question", max_tokens=2)
    assert result.cache == CacheHit("cold", 0)
    delta = counters_delta(before, rt.counters())
    assert delta.misses == 1
    assert delta.hits_exact == delta.hits_prefix == delta.hits_resume == 0


def test_an_unknown_parent_key_falls_back_to_the_other_lookups(model):
    prompt = model.tokens("the sun was warm and the moon")
    result = model.complete(prompt, max_tokens=3, parent_key="ab" * 16)
    assert result.cache.kind == "cold"
    assert len(result.tokens) == 3


def test_parent_key_of_another_prompt_is_not_restored(model):
    a = model.complete("the cat and the dog were red", max_tokens=3)
    model.rt.cache.wait_idle()
    other = model.tokens("blue sky over the slow tree")
    result = model.complete(other, max_tokens=3, parent_key=a.finish_key)
    assert result.cache.kind == "cold"


def test_prefill_with_a_parent_key_extends_the_parent_row(model):
    prompt = model.tokens("one two three red green blue")
    first = model.complete(prompt, max_tokens=4)
    model.rt.cache.wait_idle()
    longer = [*prompt, *first.tokens, *model.tokens("the tree", add_special=False)]
    warmed = model.rt.prefill(model.name, longer, parent_key=first.finish_key)
    assert warmed.cache == CacheHit("parent", len(prompt) + 3)
    assert warmed.tokens == []
    model.rt.cache.wait_idle()
    rows = {r.key_hex: r for r in model.rt.cache_rows()}
    assert rows[warmed.finish_key].n_tokens == len(longer)
    hit = model.complete(longer, max_tokens=2)
    assert hit.cache == CacheHit("exact", len(longer))


def test_a_conversation_resent_in_full_each_turn_stays_warm(rt, load):
    load(rt, "tiny", n_ctx=1024)
    messages = [{"role": "system", "content": "you answer"}]
    previous_prompt = 0
    for i, reply in enumerate(["yes the cat", "no the dog", "the red tree", "a warm sun"]):
        messages.append({"role": "user", "content": f"question {i} about the sky"})
        result = rt.chat("m", messages, max_tokens=30, grammar=f'root ::= "{reply}"')
        assert result.text == reply
        if i == 0:
            assert result.cache.kind == "cold"
        else:
            # Turn N+1's prompt starts with turn N's: at least that much is restored.
            assert result.cache.kind == "prefix"
            assert result.usage.cached_tokens >= previous_prompt
        previous_prompt = result.usage.prompt_tokens
        messages.append({"role": "assistant", "content": result.text})


@pytest.mark.parametrize("template", [None, "gemma"], ids=["own-template", "gemma-folds-system"])
def test_chats_sharing_a_system_preamble_continue_from_its_state(rt, load, template):
    # Agents: one system prompt, many conversations. The first chat saves where its
    # system message ends as well as at its prompt's end, so the others restore it.
    # llama.cpp's gemma template has no system role (the text opens the first user
    # turn, and a system message alone renders to nothing): the save point holds too.
    load(rt, "tiny", n_ctx=1024)
    rng = random.Random(7)
    system = {"role": "system", "content": " ".join(rng.choices(TINY_WORDS, k=80))}
    first = rt.chat(
        "m", [system, {"role": "user", "content": "the cat"}], template=template, max_tokens=2
    )
    assert first.cache.kind == "cold"
    rt.cache.wait_idle()
    preamble, whole = sorted(r.n_tokens for r in rows_by_reason(rt, "cold"))
    assert 80 <= preamble < whole == first.usage.prompt_tokens
    for question in ("a red tree", "the blue moon and the sun"):
        other = rt.chat(
            "m", [system, {"role": "user", "content": question}], template=template, max_tokens=2
        )
        # At least the preamble; more where the tiny model can cut the longer row back
        # (a sliding-window model cannot past its window: then the preamble row serves).
        assert other.cache.kind == "prefix" and other.cache.prefix_len >= preamble
        assert other.usage.cached_tokens == other.cache.prefix_len


def test_a_chat_without_a_system_message_saves_only_at_its_prompt_end(rt, load):
    load(rt, "tiny", n_ctx=1024)
    result = rt.chat("m", [{"role": "user", "content": "the cat and the warm sun"}], max_tokens=2)
    rt.cache.wait_idle()
    assert [r.n_tokens for r in rows_by_reason(rt, "cold")] == [result.usage.prompt_tokens]


# --------------------------------------------------------------------------- save reasons


def test_a_completion_saves_its_prompt_cold_and_its_context_at_finish(model):
    rt = model.rt
    before = rt.counters()
    prompt = model.tokens("a warm sun and a cold moon")
    result = model.complete(prompt, max_tokens=5)
    delta = counters_delta(before, rt.counters())
    assert delta.saves_cold == 1
    assert delta.saves_finish == 1
    rows = {r.key_hex: r for r in rt.cache_rows()}
    finish = rows[result.finish_key]
    assert finish.reason == "finish"
    assert finish.n_tokens == len(prompt) + 5 - 1
    assert [r.n_tokens for r in rows_by_reason(rt, "cold")] == [len(prompt)]
    assert rt.counters().tiers[0].rows == 2


def test_continued_saves_fire_every_interval_of_generated_tokens(rt, load, model_kind):
    m = load(rt, model_kind, policy={"continued_interval": 4})
    prompt = m.tokens("the dog was slow and cold")
    before = rt.counters()
    m.complete(prompt, max_tokens=14)
    delta = counters_delta(before, rt.counters())
    assert delta.saves_continued == 3
    lengths = sorted(r.n_tokens for r in rows_by_reason(rt, "continued"))
    assert lengths == [len(prompt) + 4, len(prompt) + 8, len(prompt) + 12]


def test_evict_saves_a_request_in_flight_which_then_goes_on(rt, load, wait_until):
    stub = load(rt, "stub", stub={"step_delay": 0.01})
    prompt = stub.tokens("evict me while I generate")
    pending = in_thread(stub.complete, prompt, max_tokens=60)
    wait_until(lambda: rt.model_info("m").tokens_generated >= 5, "generation is under way")
    before = rt.counters()
    assert rt.evict("m") == 1
    result = pending.result(timeout=30)
    assert result.finish_reason == "length"
    assert len(result.tokens) == 60
    assert counters_delta(before, rt.counters()).saves_evict == 1
    (row,) = rows_by_reason(rt, "evict")
    assert len(prompt) < row.n_tokens < len(prompt) + 60
    assert rt.evict("m") == 0  # nothing in flight now


def test_unload_saves_requests_in_flight_with_reason_shutdown(rt, load, wait_until):
    stub = load(rt, "stub", n_seq_max=2, stub={"step_delay": 0.01})
    prompts = [stub.tokens(f"shutdown prompt number {i} here") for i in range(3)]
    pending = [in_thread(stub.complete, p, max_tokens=2000) for p in prompts]
    wait_until(
        lambda: rt.model_info("m").active == 2 and rt.pending_len("m") == 1,
        "two requests run and one waits",
    )
    wait_until(lambda: rt.model_info("m").tokens_generated >= 10, "both generate")
    before = rt.counters()
    rt.unload("m")
    finished: list[tuple[list[int], dict[str, Any]]] = []
    errors: list[BaseException] = []
    for prompt, future in zip(prompts, pending, strict=True):
        try:
            finished.append((prompt, future.result(timeout=10)))
        except Exception as exc:
            errors.append(exc)
    assert len(finished) == 2 and len(errors) == 1
    assert all(result.finish_reason == "cancelled" for _, result in finished)
    assert "unloaded" in str(errors[0])
    assert counters_delta(before, rt.counters()).saves_shutdown == 2
    saved = sorted(r.n_tokens for r in rows_by_reason(rt, "shutdown"))
    assert saved == sorted(len(p) + len(r.tokens) - 1 for p, r in finished)
    # The rows outlive the model: a reload resumes each conversation where it stopped,
    # by prefix or through the finish_key each cancelled result carries.
    reloaded = load(rt, "stub", n_seq_max=2)
    for prompt, result in finished:
        assert result.finish_key is not None
        resumed = reloaded.complete([*prompt, *result.tokens], max_tokens=2)
        assert resumed.cache == CacheHit("prefix", len(prompt) + len(result.tokens) - 1)
        by_key = reloaded.complete(
            [*prompt, *result.tokens], max_tokens=2, parent_key=result.finish_key
        )
        assert by_key.cache.kind == "parent"
        assert by_key.tokens == resumed.tokens


def test_stopping_the_runtime_saves_requests_in_flight_to_disk(
    make_runtime, load, tmp_path, wait_until
):
    rt = make_runtime()
    stub = load(rt, "stub", tier="disk", stub={"step_delay": 0.01})
    prompt = stub.tokens("stop the runtime under me")
    pending = in_thread(stub.complete, prompt, max_tokens=2000)
    wait_until(lambda: rt.model_info("m").tokens_generated >= 10, "generation is under way")
    rt.stop()
    result = pending.result(timeout=10)
    assert result.finish_reason == "cancelled"
    generated = result.tokens
    assert len(generated) >= 10
    # A new runtime on the same roots finds the shutdown row on disk and resumes from it.
    again = make_runtime(tmp_path)
    rows = [r for r in again.cache_rows() if r.reason == "shutdown"]
    assert len(rows) == 1
    assert rows[0].tier.startswith("disk:")
    assert len(generated) - 1 <= rows[0].n_tokens - len(prompt) <= len(generated)
    reloaded = load(again, "stub", tier="disk")
    resumed = reloaded.complete([*prompt, *generated], max_tokens=3)
    assert resumed.cache.kind in ("prefix", "exact")
    assert resumed.cache.prefix_len == rows[0].n_tokens
    reference = load(again, "stub", "ref", reference=True)
    assert resumed.tokens == reference.complete([*prompt, *generated], max_tokens=3).tokens


def test_counters_follow_a_session_of_requests(model):
    rt = model.rt
    before = rt.counters()
    prompt = model.tokens("the tree and the sky")
    first = model.complete(prompt, max_tokens=4)  # miss, cold + finish saves
    model.complete(prompt, max_tokens=4)  # exact hit; its finish row exists already
    follow = [*prompt, *first.tokens]
    model.complete(follow, max_tokens=4, parent_key=first.finish_key)  # resume
    model.complete([*prompt, *model.tokens("blue", add_special=False)], max_tokens=2)  # prefix
    rt.cache.wait_idle()
    delta = counters_delta(before, rt.counters())
    assert delta.misses == 1
    assert delta.hits_exact == 1
    assert delta.hits_resume == 1
    assert delta.hits_prefix == 1
    assert delta.saves_cold == 1
    assert delta.saves_finish >= 3
    assert delta.duplicate_dropped >= 1
    ram = next(t for t in rt.counters().tiers if t.kind == "ram")
    assert ram.rows == len([r for r in rt.cache_rows() if r.tier == "ram"])
    assert ram.bytes == sum(r.size for r in rt.cache_rows() if r.tier == "ram")


@pytest.mark.parametrize("tier", TIERS)
def test_a_save_and_a_restore_copy_the_state_at_most_once(rt, load, tier):
    """The worker packs into shared memory that a RAM row keeps as it is (no copy) and
    restores from it as it is; a file tier costs one copy each way (write, read)."""
    m = load(rt, "tiny", f"copies-{tier}", tier=tier)
    prompt = m.tokens("the sun and the moon and the sky were warm")
    before = rt.counters()
    m.complete(prompt, max_tokens=3)
    rt.cache.wait_idle()
    hit = m.complete(prompt, max_tokens=3)
    rt.cache.wait_idle()
    assert hit.cache.kind == "exact"
    delta = counters_delta(before, rt.counters())
    assert delta.saved_bytes > 0 and delta.loaded_bytes > 0
    copies = 0 if tier == "ram" else 1
    assert delta.save_bytes_copied == copies * delta.saved_bytes
    assert delta.load_bytes_copied == copies * delta.loaded_bytes


@pytest.mark.parametrize("tier", TIERS)
def test_an_exact_hit_samples_its_first_token_in_the_restore_call(rt, load, tier, monkeypatch):
    """One worker round trip to the first token: the worker samples it right after the
    restore (and the RAM row's checksum) succeed, with what a step would have returned."""
    m = load(rt, "tiny", f"first-{tier}", tier=tier)
    prompt = m.tokens("the tree and the dog and the blue sky")
    cold = m.complete(prompt, max_tokens=1, logprobs=2)
    rt.cache.wait_idle()
    commands: list[str] = []
    call = WorkerClient.call

    def counting(self: WorkerClient, command: Any) -> Any:
        commands.append(type(command).__name__)
        return call(self, command)

    monkeypatch.setattr(WorkerClient, "call", counting)
    hit = m.complete(prompt, max_tokens=1, logprobs=2)
    assert hit.cache == CacheHit("exact", len(prompt))
    assert "Step" not in commands
    assert hit.tokens == cold.tokens
    assert hit.logprobs == cold.logprobs
    assert hit.timings.ttft_ms is not None
    longer = m.complete(prompt, max_tokens=4)
    assert longer.cache.kind == "exact"
    assert longer.tokens[:1] == cold.tokens


# --------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def tiers(module_rt, load) -> dict[str, Any]:
    """The tiny model once per tier (``ram``, ``ram_file``, ``disk``) and a cold ``ref``.

    Shared by the exactness tests of this module: each opens its prompts with a word of
    its own, so no test restores another's rows (their common prefix is the BOS alone).
    """
    models = {tier: load(module_rt, "tiny", f"tiny-{tier}", tier=tier) for tier in TIERS}
    models["ref"] = load(module_rt, "tiny", "tiny-ref", reference=True)
    return models


_opening_words = iter(DEFAULT_WORDS)
OPENING = {
    (test, tier, sampling, k): next(_opening_words)
    for test, ks in (("resume", (1, 9)), ("exact", (0,)))
    for tier in TIERS
    for sampling in SAMPLINGS
    for k in ks
}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("k", [1, 9])
def test_stop_and_resume_gives_the_tokens_of_one_uninterrupted_run_on_every_tier(
    tiers, tier, sampling, k
):
    options = SAMPLINGS[sampling]
    reference, tiny = tiers["ref"], tiers[tier]
    n = 24
    opening = OPENING["resume", tier, sampling, k]
    prompt = tiny.tokens(f"{opening} the cat and the dog were red")
    whole = reference.complete(prompt, max_tokens=n, **options)
    assert whole.cache.kind == "cold" and len(whole.tokens) == n
    part = tiny.complete(prompt, max_tokens=k, **options)
    assert part.cache.kind == "cold"
    assert part.tokens == whole.tokens[:k]
    rest = tiny.complete(
        [*prompt, *part.tokens], max_tokens=n - k, parent_key=part.finish_key, **options
    )
    assert rest.cache == CacheHit("parent", len(prompt) + k - 1)
    assert part.tokens + rest.tokens == whole.tokens
    # The parent row was saved to the tier under test (a hit may add a RAM copy).
    holders = {r.tier.split(":")[0] for r in tiny.rt.cache_rows() if r.key_hex == part.finish_key}
    assert tier in holders


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_an_exact_hit_on_a_cold_saved_prompt_continues_as_the_cold_run(tiers, tier, sampling):
    options = SAMPLINGS[sampling]
    reference, tiny = tiers["ref"], tiers[tier]
    opening = OPENING["exact", tier, sampling, 0]
    prompt = tiny.tokens(f"{opening} a warm sun and a cold moon over the tree")
    cold = reference.complete(prompt, max_tokens=20, **options)
    warmed = tiny.rt.prefill(tiny.name, prompt)
    assert warmed.cache.kind == "cold"
    tiny.rt.cache.wait_idle()
    (row,) = [r for r in tiny.rt.cache_rows() if r.key_hex == warmed.finish_key]
    assert row.reason == "cold"
    assert row.tier.split(":")[0] == tier  # no hit yet, so no RAM copy either
    hit = tiny.complete(prompt, max_tokens=20, **options)
    assert hit.cache == CacheHit("exact", len(prompt))
    assert hit.tokens == cold.tokens


def test_stop_and_resume_in_several_steps_matches_one_run(rt, load):
    reference = load(rt, "tiny", "ref", reference=True)
    tiny = load(rt, "tiny", tier="disk")
    prompt = tiny.tokens("one two three red green blue")
    whole = reference.complete(prompt, max_tokens=30, temperature=0.7, seed=7).tokens
    context, key, got = list(prompt), None, []
    for step in (5, 1, 10, 14):
        result = tiny.complete(context, max_tokens=step, temperature=0.7, seed=7, parent_key=key)
        got += result.tokens
        context += result.tokens
        key = result.finish_key
    assert got == whole


def _random_prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(TINY_WORDS) for _ in range(n_words))


def test_deterministic_mode_makes_every_hit_equal_the_cold_run(rt, load):
    options = {"n_batch": 16, "n_ctx": 512, "deterministic": True}
    reference = load(rt, "tiny", "ref", reference=True, **options)
    det = load(rt, "tiny", "det", **options)
    rng = random.Random(4)
    hits: dict[str, int] = {}
    for i in range(6):
        base = det.tokens(f"{TINY_WORDS[i]} {_random_prompt(rng, rng.randrange(20, 45))}")
        extended = [*base, *det.tokens(_random_prompt(rng, 4), add_special=False)]
        for prompt in (base, extended, base, extended[:-1]):
            result = det.complete(prompt, max_tokens=8)
            det.rt.cache.wait_idle()
            kind = result.cache.kind
            hits[kind] = hits.get(kind, 0) + 1
            if kind == "prefix":
                # Only prefill-computed state, cut back to an n_batch boundary.
                assert result.cache.prefix_len % 16 == 0
            assert result.tokens == reference.complete(prompt, max_tokens=8).tokens, (
                i,
                result.cache,
            )
        # Generated tokens are never restored: a resume restores a prefill row and
        # prefills the rest, as the cold run of the whole new prompt does.
        first = det.complete(base, max_tokens=6)
        follow = [*base, *first.tokens]
        resumed = det.complete(follow, max_tokens=6, parent_key=first.finish_key)
        assert resumed.cache.kind != "parent"
        assert resumed.tokens == reference.complete(follow, max_tokens=6).tokens
    assert hits.get("exact", 0) >= 6
    assert hits.get("prefix", 0) >= 6
