"""The save policy: every example of spec 6.3, its 7 properties, and validation messages."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erllama_py.cache.policy import (
    SavePolicy,
    cold_save_split,
    should_continued_save,
    should_finish_save,
    trim_boundary,
    validate_policy,
)
from erllama_py.errors import ConfigError

# erllama's own defaults (ours are the shipped sys.yaml's: tests/test_config.py checks them).
DEFAULT = SavePolicy(
    min_tokens=512,
    cold_min_tokens=512,
    continued_interval=2048,
    boundary_trim_tokens=32,
    boundary_align_tokens=2048,
)


def test_the_original_defaults_are_what_the_split_tests_use() -> None:
    assert asdict(DEFAULT) == {
        "min_tokens": 512,
        "cold_min_tokens": 512,
        "cold_max_tokens": 30000,
        "continued_interval": 2048,
        "boundary_trim_tokens": 32,
        "boundary_align_tokens": 2048,
        "session_resume_wait_ms": 500,
    }


# ---------------------------------------------------------------- trim_boundary


def test_trim_boundary_skips_a_prompt_too_short_to_align() -> None:
    assert trim_boundary(600, 32, 2048) is None


def test_trim_boundary_2080_keeps_2048() -> None:
    assert trim_boundary(2080, 32, 2048) == 2048


def test_trim_boundary_4500_keeps_4096() -> None:
    assert trim_boundary(4500, 32, 2048) == 4096


def test_trim_boundary_with_zero_trim_keeps_an_aligned_prompt_whole() -> None:
    assert trim_boundary(4096, 0, 2048) == 4096


@pytest.mark.parametrize("n_tokens", [1, 7, 100, 4097])
def test_trim_boundary_with_zero_trim_and_align_1_is_the_identity(n_tokens: int) -> None:
    assert trim_boundary(n_tokens, 0, 1) == n_tokens


def test_trim_boundary_skips_when_trim_exceeds_the_length() -> None:
    assert trim_boundary(10, 32, 1) is None


def test_trim_boundary_skips_an_empty_prompt() -> None:
    assert trim_boundary(0, 32, 2048) is None
    assert trim_boundary(0, 0, 1) is None


@pytest.mark.parametrize(
    ("n_tokens", "trim", "align", "message"),
    [
        (100, -1, 2048, "trim"),
        (100, 32, 0, "align"),
        (100, 32, -5, "align"),
        (-1, 0, 1, "n_tokens"),
    ],
)
def test_trim_boundary_rejects_negative_trim_and_non_positive_align(
    n_tokens: int, trim: int, align: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        trim_boundary(n_tokens, trim, align)


# ---------------------------------------------------------------- cold_save_split


def test_cold_save_split_refuses_a_prompt_under_cold_min() -> None:
    assert cold_save_split(400, DEFAULT) is None


def test_cold_save_split_refuses_a_prompt_over_cold_max() -> None:
    assert cold_save_split(30001, DEFAULT) is None
    assert cold_save_split(30000, DEFAULT) == 28672


def test_cold_save_split_refuses_a_prompt_that_does_not_reach_one_alignment() -> None:
    assert cold_save_split(600, DEFAULT) is None


def test_cold_save_split_4500_saves_4096_and_leaves_404() -> None:
    tokens = list(range(4500))
    length = cold_save_split(4500, DEFAULT)
    assert length == 4096
    assert len(tokens[length:]) == 404
    assert tokens[:length] + tokens[length:] == tokens


def test_cold_save_split_2080_saves_2048_and_leaves_32() -> None:
    assert cold_save_split(2080, DEFAULT) == 2048


def test_cold_save_split_honours_min_tokens() -> None:
    policy = replace(DEFAULT, min_tokens=5000, cold_min_tokens=5000)
    assert cold_save_split(6000, policy) is None  # 5968 aligns down to 4096 < 5000
    assert cold_save_split(6200, policy) == 6144


# ---------------------------------------------------------------- continued and finish


def test_continued_save_waits_for_a_full_interval() -> None:
    assert not should_continued_save(3000, 2000, DEFAULT)


def test_continued_save_fires_after_a_full_interval() -> None:
    assert should_continued_save(4048, 2000, DEFAULT)


def test_continued_save_needs_min_tokens_even_after_an_interval() -> None:
    policy = replace(DEFAULT, continued_interval=100)
    assert not should_continued_save(400, 0, policy)
    assert should_continued_save(512, 0, policy)


def test_finish_save_needs_min_tokens() -> None:
    assert not should_finish_save(400, DEFAULT)
    assert should_finish_save(512, DEFAULT)
    assert should_finish_save(8192, DEFAULT)


def test_finish_save_never_saves_an_empty_context() -> None:
    assert not should_finish_save(0, SavePolicy(min_tokens=0, cold_min_tokens=0))


def test_min_tokens_none_disables_every_gated_save() -> None:
    never = SavePolicy(min_tokens=None)
    assert not never.saves_enabled
    assert cold_save_split(4500, never) is None
    assert not should_continued_save(10**6, 0, never)
    assert not should_finish_save(10**6, never)
    assert validate_policy({"min_tokens": None}) == never


# ---------------------------------------------------------------- validation


def test_validate_policy_accepts_a_full_valid_mapping() -> None:
    values = asdict(DEFAULT) | {"min_tokens": 4, "cold_min_tokens": 4, "boundary_align_tokens": 1}
    assert asdict(validate_policy(values)) == values


def test_validate_policy_fills_missing_keys_with_defaults() -> None:
    assert validate_policy({"continued_interval": 64}) == SavePolicy(continued_interval=64)
    assert validate_policy({}) == SavePolicy()
    assert validate_policy(None) == SavePolicy()


def test_validate_policy_returns_a_policy_unchanged() -> None:
    policy = SavePolicy(continued_interval=7)
    assert validate_policy(policy) is policy


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cold_min_tokens": 10}, "policy.cold_min_tokens: must be >= min_tokens (64), got 10"),
        (
            {"cold_max_tokens": 10},
            "policy.cold_max_tokens: must be >= cold_min_tokens (64), got 10",
        ),
        ({"boundary_align_tokens": 0}, "policy.boundary_align_tokens: must be > 0, got 0"),
        ({"continued_interval": 0}, "policy.continued_interval: must be > 0, got 0"),
        ({"min_tokens": -1}, "policy.min_tokens: must be >= 0, got -1"),
        ({"boundary_trim_tokens": -3}, "policy.boundary_trim_tokens: must be >= 0, got -3"),
        ({"session_resume_wait_ms": -1}, "policy.session_resume_wait_ms: must be >= 0, got -1"),
        ({"min_tokens": True}, "policy.min_tokens: must be an integer >= 0, got True"),
        ({"continued_interval": 2.5}, "policy.continued_interval: must be an integer > 0, got 2.5"),
        (
            {"cold_max_tokens": "30000"},
            "policy.cold_max_tokens: must be an integer >= 0, got '30000'",
        ),
        ({"cold_min_tokens": None}, "policy.cold_min_tokens: must be an integer >= 0, got None"),
        ({"min_token": 5}, "policy.min_token: unknown key (known keys: min_tokens, "),
    ],
)
def test_validate_policy_errors_name_the_key_path_and_the_value(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_policy(values)
    assert str(caught.value).startswith(message)


def test_validate_policy_uses_the_callers_key_prefix() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_policy({"continued_interval": 0}, key_prefix="models[2].policy")
    assert caught.value.key == "models[2].policy.continued_interval"


def test_validate_policy_rejects_what_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^policy: must be a mapping, got list"):
        validate_policy([1, 2])


def test_a_policy_cannot_be_constructed_invalid() -> None:
    with pytest.raises(ConfigError, match=r"policy\.cold_max_tokens"):
        SavePolicy(cold_max_tokens=1)


# ---------------------------------------------------------------- properties

_lengths = st.integers(0, 40_000)
_trims = st.integers(0, 3000)
_aligns = st.integers(1, 4096)


@given(_lengths, _trims, _aligns)
def test_trimmed_length_is_aligned_or_the_prompt_is_too_short(
    n: int, trim: int, align: int
) -> None:
    length = trim_boundary(n, trim, align)
    if length is None:
        assert n - trim < align
    else:
        assert length % align == 0
        assert length > 0


@given(st.lists(st.integers(0, 9), max_size=300), st.integers(0, 50), st.integers(1, 64))
def test_trimmed_tokens_are_a_prefix_of_the_input(tokens: list[int], trim: int, align: int) -> None:
    length = trim_boundary(len(tokens), trim, align)
    if length is not None:
        prefix = tokens[:length]
        assert len(prefix) == length
        assert tokens[: len(prefix)] == prefix


@given(_lengths, _trims, _aligns)
def test_trimmed_length_is_never_longer_than_the_input(n: int, trim: int, align: int) -> None:
    length = trim_boundary(n, trim, align)
    assert length is None or length <= n


@given(_lengths, _trims, _aligns)
def test_trimming_drops_at_least_trim_tokens(n: int, trim: int, align: int) -> None:
    length = trim_boundary(n, trim, align)
    assert length is None or n - length >= trim


@st.composite
def _policies(draw: st.DrawFn) -> dict[str, Any]:
    min_tokens = draw(st.integers(0, 5000))
    cold_min = draw(st.integers(min_tokens, min_tokens + 5000))
    return {
        "min_tokens": min_tokens,
        "cold_min_tokens": cold_min,
        "cold_max_tokens": draw(st.integers(cold_min, cold_min + 40_000)),
        "continued_interval": draw(st.integers(1, 10_000)),
        "boundary_trim_tokens": draw(st.integers(0, 500)),
        "boundary_align_tokens": draw(st.integers(1, 4096)),
        "session_resume_wait_ms": draw(st.integers(0, 10_000)),
    }


@given(st.lists(st.integers(0, 3), max_size=3000), _policies())
def test_cold_split_concatenates_back_to_the_input(
    tokens: list[int], values: dict[str, Any]
) -> None:
    length = cold_save_split(len(tokens), validate_policy(values))
    if length is not None:
        assert tokens[:length] + tokens[length:] == tokens
        assert 0 < length <= len(tokens)


@given(_lengths, _policies())
def test_a_cold_split_implies_alignment_and_bounds(n: int, values: dict[str, Any]) -> None:
    policy = validate_policy(values)
    length = cold_save_split(n, policy)
    if length is not None:
        assert length % policy.boundary_align_tokens == 0
        assert policy.cold_min_tokens <= n <= policy.cold_max_tokens
        assert length >= (policy.min_tokens or 0)
        assert n - length >= policy.boundary_trim_tokens


@given(_policies())
def test_any_generated_valid_policy_validates(values: dict[str, Any]) -> None:
    assert asdict(validate_policy(values)) == values


@given(_policies(), st.sampled_from(sorted(asdict(DEFAULT))), st.integers(-100, -1))
def test_any_negative_value_is_rejected_naming_its_key(
    values: dict[str, Any], key: str, bad: int
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_policy(values | {key: bad})
    assert caught.value.key == f"policy.{key}"
