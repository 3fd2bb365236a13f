"""sys.yaml schema: defaults, every validation rule, and the key path in each error."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from erllama_py.config import (
    MB,
    Config,
    SavePolicy,
    check_tier_roots,
    load_config,
    parse_config,
)
from erllama_py.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _base() -> dict[str, Any]:
    return {
        "cache": {
            "tiers": [
                {"kind": "ram", "quota_mb": 64},
                {"kind": "disk", "root": "/tmp/erllama-test-disk", "quota_mb": 128},
            ]
        },
        "models": [{"name": "m", "backend": "stub"}],
    }


def _error(raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value


def test_no_config_gives_every_default() -> None:
    config = load_config(None)
    assert isinstance(config, Config)
    assert [t.kind for t in config.cache.tiers] == ["ram", "ram_file", "disk"]
    assert config.policy == SavePolicy()
    assert config.models == ()
    assert config.restart.intensity == 5
    assert config.pressure.enabled is False


def test_the_shipped_sys_yaml_is_valid() -> None:
    config = load_config(REPO / "sys.yaml")
    assert config.models[0].name == "gemma-3-270m"
    assert config.models[0].model == "gemma-3-270m"
    assert [t.kind for t in config.cache.tiers] == ["ram", "ram_file", "disk"]


def test_the_defaults_are_the_shipped_sys_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    # One set of defaults: a config that leaves out a section gets what sys.yaml says.
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    shipped = load_config(REPO / "sys.yaml")
    assert dataclasses.replace(shipped, models=()) == load_config(None)


def test_settings_are_frozen() -> None:
    config = parse_config(_base())
    with pytest.raises(AttributeError):
        config.cache.writers = 3  # type: ignore[misc]


def test_quota_is_converted_to_bytes() -> None:
    config = parse_config(_base())
    assert config.cache.tiers[0].quota_bytes == 64 * MB


def test_negative_quota_names_the_tier_index() -> None:
    raw = _base()
    raw["cache"]["tiers"][1]["quota_mb"] = -5
    err = _error(raw)
    assert err.key == "cache.tiers[1].quota_mb"
    assert str(err) == "cache.tiers[1].quota_mb: must be a positive integer, got -5"


@pytest.mark.parametrize(
    ("path", "value", "key", "fragment"),
    [
        (("cache", "writers"), 0, "cache.writers", "positive integer"),
        (("cache", "writers"), "two", "cache.writers", "must be an integer, got 'two'"),
        (("cache", "writers"), True, "cache.writers", "must be an integer"),
        (("cache", "promote_on_hit"), "yes", "cache.promote_on_hit", "true or false"),
        (("cache", "reservation_ttl_s"), 0, "cache.reservation_ttl_s", "> 0"),
        (("restart", "intensity"), -1, "restart.intensity", ">= 0"),
        (("restart", "period_s"), 0, "restart.period_s", "> 0"),
        (("policy", "min_tokens"), -1, "policy.min_tokens", ">= 0"),
        (("policy", "continued_interval"), 0, "policy.continued_interval", "> 0"),
        (("policy", "boundary_align_tokens"), 0, "policy.boundary_align_tokens", "> 0"),
        (("server", "port"), 70000, "server.port", "<= 65535"),
        (("pressure", "high_watermark"), 1.5, "pressure.high_watermark", "<= 1"),
        (("pressure", "source"), "gpu", "pressure.source", "one of system, noop"),
    ],
)
def test_each_scalar_rule_names_its_key(
    path: tuple[str, str], value: object, key: str, fragment: str
) -> None:
    raw = _base()
    raw.setdefault(path[0], {})[path[1]] = value
    err = _error(raw)
    assert err.key == key
    assert fragment in err.reason


def test_unknown_top_level_key_is_rejected() -> None:
    raw = _base()
    raw["cahce"] = {}
    err = _error(raw)
    assert err.key == "cahce"
    assert "unknown key" in err.reason


def test_unknown_nested_key_is_rejected_with_its_path() -> None:
    raw = _base()
    raw["cache"]["tiers"][0]["qouta_mb"] = 3
    err = _error(raw)
    assert err.key == "cache.tiers[0].qouta_mb"


def test_section_of_the_wrong_type_is_rejected() -> None:
    raw = _base()
    raw["cache"] = ["ram"]
    err = _error(raw)
    assert err.key == "cache"
    assert "mapping" in err.reason


def test_low_watermark_must_be_below_high() -> None:
    raw = _base()
    raw["pressure"] = {"high_watermark": 0.5, "low_watermark": 0.5}
    err = _error(raw)
    assert err.key == "pressure.low_watermark"
    assert "< high_watermark" in err.reason


def test_evict_tiers_must_be_tier_kinds() -> None:
    raw = _base()
    raw["pressure"] = {"evict_tiers": ["ram", "ssd"]}
    assert _error(raw).key == "pressure.evict_tiers[1]"


def test_cold_min_below_min_tokens_is_rejected() -> None:
    raw = _base()
    raw["policy"] = {"min_tokens": 512, "cold_min_tokens": 100}
    err = _error(raw)
    assert err.key == "policy.cold_min_tokens"
    assert "must be >= min_tokens (512), got 100" in err.reason


def test_cold_max_below_cold_min_is_rejected() -> None:
    raw = _base()
    raw["policy"] = {"cold_min_tokens": 600, "cold_max_tokens": 599, "min_tokens": 10}
    assert _error(raw).key == "policy.cold_max_tokens"


def test_model_policy_override_is_checked_against_the_merged_policy() -> None:
    raw = _base()
    raw["policy"] = {"min_tokens": 100, "cold_min_tokens": 100}
    raw["models"][0]["policy"] = {"cold_min_tokens": 50}
    err = _error(raw)
    assert err.key == "models[0].policy.cold_min_tokens"


def test_model_policy_overrides_the_system_policy() -> None:
    raw = _base()
    raw["policy"] = {"continued_interval": 100}
    raw["models"][0]["policy"] = {"min_tokens": 4, "cold_min_tokens": 4}
    policy = parse_config(raw).models[0].policy
    assert (policy.min_tokens, policy.cold_min_tokens, policy.continued_interval) == (4, 4, 100)


def test_unknown_model_policy_key_is_rejected() -> None:
    raw = _base()
    raw["models"][0]["policy"] = {"min_tokns": 4}
    assert _error(raw).key == "models[0].policy.min_tokns"


def test_tier_kind_is_required_and_checked() -> None:
    raw = _base()
    del raw["cache"]["tiers"][0]["kind"]
    assert _error(raw).key == "cache.tiers[0].kind"
    raw = _base()
    raw["cache"]["tiers"][0]["kind"] = "nvme"
    err = _error(raw)
    assert err.key == "cache.tiers[0].kind"
    assert "'nvme'" in err.reason


def test_file_tier_needs_a_root_and_ram_tier_has_none() -> None:
    raw = _base()
    del raw["cache"]["tiers"][1]["root"]
    assert _error(raw).key == "cache.tiers[1].root"
    raw = _base()
    raw["cache"]["tiers"][0]["root"] = "/tmp/x"
    assert _error(raw).key == "cache.tiers[0].root"


def test_duplicate_tier_roots_are_rejected() -> None:
    raw = _base()
    raw["cache"]["tiers"].append(copy.deepcopy(raw["cache"]["tiers"][1]))
    err = _error(raw)
    assert err.key == "cache.tiers[2].root"
    assert "is the folder of cache.tiers[1]" in err.reason


def test_two_ram_tiers_are_rejected_under_the_second_ones_kind() -> None:
    raw = _base()
    raw["cache"]["tiers"].append({"kind": "ram"})
    err = _error(raw)
    assert (err.key, err.reason) == (
        "cache.tiers[2].kind",
        "at most one ram tier (cache.tiers[0] is one)",
    )


@pytest.mark.parametrize(
    ("first", "second", "reason"),
    [
        ("/tmp/erllama-shared", "/tmp/erllama-shared", "is the folder of cache.tiers[1]"),
        ("/tmp/erllama-shared", "/tmp/erllama-shared/../erllama-shared/", "is the folder of"),
        ("/tmp/erllama-outer", "/tmp/erllama-outer/inner", "is inside the root of cache.tiers[1]"),
        ("/tmp/erllama-outer/inner", "/tmp/erllama-outer", "holds the root of cache.tiers[1]"),
    ],
)
def test_two_file_tiers_on_one_folder_or_nested_are_rejected(
    first: str, second: str, reason: str
) -> None:
    raw = _base()
    raw["cache"]["tiers"] = [
        {"kind": "ram"},
        {"kind": "ram_file", "root": first},
        {"kind": "disk", "root": second},
    ]
    err = _error(raw)
    assert err.key == "cache.tiers[2].root"
    assert reason in err.reason


def test_sibling_tier_roots_are_accepted() -> None:
    raw = _base()
    raw["cache"]["tiers"] = [
        {"kind": "ram"},
        {"kind": "ram_file", "root": "/tmp/erllama-a"},
        {"kind": "disk", "root": "/tmp/erllama-ab"},  # a common name prefix is not nesting
    ]
    assert len(parse_config(raw).cache.tiers) == 3


def test_a_config_without_a_policy_section_gets_the_shipped_sys_yaml_policy() -> None:
    shipped = load_config(REPO / "sys.yaml").policy
    assert parse_config({}).policy == shipped
    assert load_config(None).policy == shipped
    assert SavePolicy() == shipped


@pytest.mark.parametrize("source", [[1, 2], 42, b"sys.yaml"])
def test_a_config_that_is_not_a_path_or_mapping_is_a_config_error(source: object) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(source)  # type: ignore[arg-type]
    assert caught.value.key == "<root>"
    assert type(source).__name__ in caught.value.reason


def test_empty_tier_list_is_rejected() -> None:
    raw = _base()
    raw["cache"]["tiers"] = []
    assert _error(raw).key == "cache.tiers"


def test_tier_root_expands_the_home_directory() -> None:
    raw = _base()
    raw["cache"]["tiers"][1]["root"] = "~/kvc"
    config = parse_config(raw)
    assert config.cache.tiers[1].root == Path(os.path.expanduser("~/kvc"))


def test_model_needs_a_name() -> None:
    raw = _base()
    raw["models"] = [{"backend": "stub"}]
    assert _error(raw).key == "models[0].name"


def test_llama_model_needs_exactly_one_source() -> None:
    raw = _base()
    raw["models"] = [{"name": "m"}]
    assert _error(raw).key == "models[0]"
    raw["models"] = [{"name": "m", "model": "gemma-3-270m", "model_path": "/x.gguf"}]
    assert _error(raw).key == "models[0]"


def test_model_tier_must_exist() -> None:
    raw = _base()
    raw["models"][0]["tier"] = "ram_file"
    err = _error(raw)
    assert err.key == "models[0].tier"
    assert "ram" in err.reason


def test_model_tier_may_name_a_kind_or_a_full_tier_name() -> None:
    raw = _base()
    raw["models"][0]["tier"] = "disk"
    assert parse_config(raw).models[0].tier == "disk"
    raw["models"][0]["tier"] = "disk:/tmp/erllama-test-disk"
    assert parse_config(raw).models[0].tier == "disk:/tmp/erllama-test-disk"


def test_duplicate_model_names_are_rejected() -> None:
    raw = _base()
    raw["models"].append({"name": "m", "backend": "stub"})
    assert _error(raw).key == "models[1].name"


def test_n_batch_must_exceed_n_seq_max() -> None:
    raw = _base()
    raw["models"][0].update({"n_seq_max": 8, "n_batch": 8})
    assert _error(raw).key == "models[0].n_batch"


def test_n_seq_max_is_capped() -> None:
    raw = _base()
    raw["models"][0].update({"n_seq_max": 300, "n_batch": 512})
    assert _error(raw).key == "models[0].n_seq_max"


def test_api_keys_must_be_strings() -> None:
    raw = _base()
    raw["server"] = {"api_keys": ["ok", 3]}
    assert _error(raw).key == "server.api_keys[1]"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read" in info.value.reason


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("cache: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in info.value.reason


def test_yaml_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sys.yaml"
    path.write_text(yaml.safe_dump(_base()))
    assert load_config(path) == parse_config(_base())


def test_tier_root_that_cannot_be_created_names_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    raw = _base()
    raw["cache"]["tiers"][1]["root"] = str(blocker / "kvc")
    config = parse_config(raw)
    with pytest.raises(ConfigError) as info:
        check_tier_roots(config.cache)
    assert info.value.key == "cache.tiers[1].root"


def test_tier_roots_are_created(tmp_path: Path) -> None:
    raw = _base()
    raw["cache"]["tiers"][1]["root"] = str(tmp_path / "a" / "b")
    check_tier_roots(parse_config(raw).cache)
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("deadline_floor_s", 0, "must be > 0, got 0"),
        ("deadline_floor_s", "soon", "must be a number, got 'soon'"),
        ("deadline_factor", 0.5, "must be >= 1, got 0.5"),
    ],
)
def test_worker_deadlines_are_validated(key: str, value: object, reason: str) -> None:
    raw = _base()
    raw["models"][0][key] = value
    err = _error(raw)
    assert (err.key, err.reason) == (f"models[0].{key}", reason)


def test_worker_deadlines_default_to_the_shipped_values() -> None:
    shipped = load_config(REPO / "sys.yaml").models[0]
    model = parse_config(_base()).models[0]
    assert (model.deadline_floor_s, model.deadline_factor) == (120.0, 20.0)
    assert (shipped.deadline_floor_s, shipped.deadline_factor) == (120.0, 20.0)


def test_daemon_files_default_to_the_users_runtime_and_state_folders(monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.local/state")
    daemon = load_config(None).daemon
    assert daemon.pid_file == Path("/run/user/1000/erllama-py/erllama-py.pid")
    assert daemon.control_socket == Path("/run/user/1000/erllama-py/control.sock")
    assert daemon.log_file == Path("/home/u/.local/state/erllama-py/erllama-py.log")
    assert (daemon.log_max_bytes, daemon.log_backups) == (16 * 1024 * 1024, 3)
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    fallback = load_config(None).daemon.control_socket
    assert fallback == Path(f"/tmp/erllama-py-{os.getuid()}/control.sock")


def test_daemon_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"daemon.control_socket: a Unix socket path"):
        load_config({"daemon": {"control_socket": "/tmp/" + "s" * 120}})
    with pytest.raises(ConfigError, match=r"daemon.log_max_mb: must be a positive integer"):
        load_config({"daemon": {"log_max_mb": 0}})
    with pytest.raises(ConfigError, match=r"daemon.log_backups: must be an integer >= 0"):
        load_config({"daemon": {"log_backups": -1}})
    assert load_config({"daemon": {"log_max_mb": 2}}).daemon.log_max_bytes == 2 * 1024 * 1024
