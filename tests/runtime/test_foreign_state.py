"""No foreign state, ever: a row is restored only into the namespace it was saved in.

The namespace is the model's fingerprint, its quant and the context parameters that
shape its state (n_ctx, n_seq_max, n_vocab...). Exact and prefix lookups compute their
keys in the model's own namespace; a ``parent_key`` is any key a caller hands in, so one
from another model or another context shape must be treated as absent (the prompt goes
through the normal lookup) and counted in ``foreign_refused``. Every restore is watched
here (`PromptCache._payload` runs just before the worker is handed a row), and no hit may
restore another namespace's row, whatever the models, shapes and keys hypothesis picks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erllama_py import HitKind, Runtime
from erllama_py.cache.key import Namespace
from erllama_py.model.prompt_cache import PromptCache
from erllama_py.model.testmodel import write_test_model

FP_A, FP_B = os.urandom(32).hex(), os.urandom(32).hex()
# Stub models (fast): two fingerprints, and other state shapes of each. n_ctx is not part
# of a namespace (a row holds fewer tokens than either context: it restores into both),
# so "a" and "a_short" share theirs; the other shapes do not.
STUBS: dict[str, dict[str, Any]] = {
    "a": {"fingerprint": FP_A},
    "a_short": {"fingerprint": FP_A, "n_ctx": 256},
    "a_vocab": {"fingerprint": FP_A, "stub": {"n_vocab": 500}},
    "b": {"fingerprint": FP_B},
    "b_two_seqs": {"fingerprint": FP_B, "n_seq_max": 2},
}

restores: list[tuple[Namespace, Namespace]] = []  # (the model's, the restored row's)


@pytest.fixture(scope="module")
def watched_restores() -> Iterator[list[tuple[Namespace, Namespace]]]:
    real = PromptCache._payload

    def spy(self: PromptCache, claim: Any) -> Any:
        restores.append((self.namespace, claim.namespace))
        return real(self, claim)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PromptCache, "_payload", spy)
        yield restores


@pytest.fixture(scope="module")
def stubs(module_rt: Runtime, load: Any, watched_restores: Any) -> dict[str, Namespace]:
    namespaces = {}
    for name, options in STUBS.items():
        load(module_rt, "stub", name, **options)
        namespaces[name] = _namespace(module_rt, name)
    assert namespaces["a"] == namespaces["a_short"]
    assert len(set(namespaces.values())) == len(STUBS) - 1
    return namespaces


def _namespace(rt: Runtime, name: str) -> Namespace:
    return rt._tree.models.get(name).shared.namespace()


tokens = st.lists(st.integers(3, 40), min_size=4, max_size=10)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    producer=st.sampled_from(sorted(STUBS)),
    consumer=st.sampled_from(sorted(STUBS)),
    base=tokens,
    extra=st.lists(st.integers(3, 40), min_size=1, max_size=3),
)
def test_a_parent_key_restores_only_into_its_own_namespace(  # noqa: PLR0917
    module_rt: Runtime,
    stubs: dict[str, Namespace],
    producer: str,
    consumer: str,
    base: list[int],
    extra: list[int],
) -> None:
    key = module_rt.model(producer).prefill(base).finish_key
    assert key is not None
    before = module_rt.counters().foreign_refused
    result = module_rt.model(consumer).complete([*base, *extra], max_tokens=1, parent_key=key)
    refused = module_rt.counters().foreign_refused - before
    if stubs[producer] == stubs[consumer]:
        assert result.cache.kind is not HitKind.COLD  # its parent (at least) was there
        assert refused == 0
    else:
        assert result.cache.kind is not HitKind.PARENT
        if result.cache.kind is not HitKind.EXACT:  # an exact hit never looks at the parent
            assert refused == 1
    assert all(own == row for own, row in restores), "a row of another namespace was restored"


def test_every_restore_was_watched(stubs: dict[str, Namespace]) -> None:
    # The property above saw restores at all (the spy is where restores happen).
    assert restores and all(own == row for own, row in restores)


@pytest.fixture(scope="module")
def other_tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("tiny-b") / "tiny-b.gguf", seed=1)


def test_a_real_models_finish_key_given_to_another_model_or_shape_is_absent(
    module_rt: Runtime, load: Any, other_tiny_path: Path
) -> None:
    # The original fault: another model continued from this one's state (a parent hit),
    # and another context shape failed with an untyped ModelError from the worker.
    load(module_rt, "tiny", "tiny_a")
    load(module_rt, "tiny", "tiny_b", model_path=other_tiny_path)
    load(module_rt, "tiny", "tiny_a_two_seqs", n_seq_max=2)
    prompt = list(range(5, 25))
    key = module_rt.model("tiny_a").prefill(prompt).finish_key
    for name in ("tiny_b", "tiny_a_two_seqs"):
        m = module_rt.model(name)
        before = module_rt.counters().foreign_refused
        resumed = m.complete([*prompt, 30, 31], max_tokens=4, parent_key=key)
        assert resumed.cache.kind is HitKind.COLD
        assert module_rt.counters().foreign_refused == before + 1
        cold = m.complete([*prompt, 30, 31], max_tokens=4, parent_key=None)
        assert resumed.tokens == cold.tokens  # its own computation, not the other model's
    same = module_rt.model("tiny_a").complete([*prompt, 30, 31], max_tokens=4, parent_key=key)
    assert same.cache.kind is HitKind.PARENT
