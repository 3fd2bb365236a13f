"""The Ray extra's parts that need no cluster: the core never imports Ray, the affinity
key and policy, the ``ray:`` config section, node-local slots, merged metrics, and the
``/ray/status`` page as ``erllama-py status`` reads it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from erllama_py.cache.counters import CounterSnapshot, TierStats
from erllama_py.config import load_config
from erllama_py.daemon.replicas import parse_ray_status
from erllama_py.errors import ConfigError
from erllama_py.kinds import TierKind
from erllama_py.ray.affinity import AffinityMap, affinity_key, choose_target, prompt_bytes
from erllama_py.ray.merged_metrics import merge_metrics
from erllama_py.ray.messages import ReplicaStatus
from erllama_py.ray.slots import claim_slot, node_local_config


def test_the_core_and_the_server_never_import_ray() -> None:
    code = (
        "import sys, erllama_py, erllama_py.cli, erllama_py.server.app, erllama_py.server.serve\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _chat(*contents: str) -> bytes:
    roles = ["system", "user", "assistant"]
    messages = [{"role": roles[min(i, 1) if i < 2 else 2 - i % 2], "content": c}
                for i, c in enumerate(contents)]  # fmt: skip
    return prompt_bytes({"model": "m", "messages": messages})


def test_a_resent_conversation_shares_every_full_block_of_the_earlier_turn() -> None:
    turn1 = _chat("You are terse. " * 10, "Tell me about printing presses. " * 4)
    turn2 = _chat("You are terse. " * 10, "Tell me about printing presses. " * 4,
                  "Gutenberg, 1440.", "And after that?")  # fmt: skip
    k1, k2 = affinity_key(turn1, 32, 64), affinity_key(turn2, 32, 64)
    assert len(k1) == len(turn1) // 32 > 0
    assert k2[: len(k1)] == k1  # the earlier turn's blocks, exactly
    other = affinity_key(_chat("You are verbose. " * 10, "Hi"), 32, 64)
    assert other[0] != k1[0]


def test_the_key_covers_the_model_and_at_most_max_blocks() -> None:
    a = prompt_bytes({"model": "a", "prompt": "x" * 1000})
    b = prompt_bytes({"model": "b", "prompt": "x" * 1000})
    assert affinity_key(a, 64, 4) != affinity_key(b, 64, 4)
    assert len(affinity_key(a, 64, 4)) == 4
    assert affinity_key(prompt_bytes({"model": "a", "prompt": "short"}), 64, 4) == ()
    tokens = prompt_bytes({"model": "a", "prompt": list(range(300))})
    assert len(affinity_key(tokens, 64, 64)) > 0


def test_the_policy_prefers_the_longest_prefix_then_rendezvous_unless_overloaded() -> None:
    where = AffinityMap()
    key = ("h1", "h2", "h3")
    where.record(("h1",), "r1")
    where.record(("h1", "h2"), "r2")
    lens = {"r1": 0, "r2": 1, "r3": 0}
    choice = choose_target(key, where, lens, imbalance_threshold=4)
    assert (choice.replica, choice.reason, choice.depth) == ("r2", "prefix", 2)
    # r2 too busy compared with the least-loaded: load wins
    busy = choose_target(key, where, {"r1": 0, "r2": 9, "r3": 0}, imbalance_threshold=4)
    assert (busy.replica, busy.reason) == ("r1", "load")
    # a new conversation: the same replica from any router (no shared state)
    fresh = [choose_target(("n1",), AffinityMap(), lens, 4) for _ in range(3)]
    assert len({c.replica for c in fresh}) == 1 and fresh[0].reason == "rendezvous"
    # no key: least loaded; a dead replica's entries are forgotten
    assert choose_target((), where, {"r1": 3, "r3": 1}, 4).replica == "r3"
    where.forget("r2")  # r2 was last sent h1 and h2: nothing of this key is left
    assert where.longest(key, ["r1", "r2", "r3"]) is None
    with pytest.raises(ValueError, match="no live replica"):
        choose_target(key, where, {}, 4)


def test_the_affinity_map_is_bounded() -> None:
    where = AffinityMap(max_entries=3)
    where.record(("a", "b", "c", "d"), "r1")
    assert len(where) == 3 and where.longest(("a",), ["r1"]) is None


def test_the_ray_section_is_validated_like_the_others() -> None:
    config = load_config({"ray": {"replicas": 3, "resources_per_replica": {"gpu_slot": 1},
                                  "router": "default"}})  # fmt: skip
    assert (config.ray.replicas, config.ray.router) == (3, "default")
    assert dict(config.ray.resources_per_replica) == {"gpu_slot": 1.0}
    assert load_config(None).ray.router == "affinity"
    bad = [
        ({"replicas": 0}, "ray.replicas"),
        ({"router": "random"}, "ray.router"),
        ({"resources_per_replica": {"x": -1}}, "ray.resources_per_replica.x"),
        ({"affinity_block_chars": 0}, "ray.affinity_block_chars"),
        ({"colour": 1}, "ray.colour"),
    ]
    for raw, key in bad:
        with pytest.raises(ConfigError) as info:
            load_config({"ray": raw})
        assert info.value.key == key


def test_replicas_on_one_node_get_their_own_slots_and_a_dead_ones_slot_is_reused(
    tmp_path: Path,
) -> None:
    first = claim_slot("node-a", tmp_path)
    second = claim_slot("node-a", tmp_path)
    assert (first.number, second.number) == (0, 1)
    assert claim_slot("node-b", tmp_path).number == 0
    first.release()  # as when its process dies
    assert claim_slot("node-a", tmp_path).number == 0
    config = load_config({"cache": {"tiers": [
        {"kind": "ram"}, {"kind": "disk", "root": str(tmp_path / "kvc/{node}")}]}})  # fmt: skip
    local = node_local_config(config, "node-a", 1)
    assert local.cache.tiers[1].root == tmp_path / "kvc/node-a/slot-1"
    assert local.cache.tiers[0].root is None


def test_metrics_of_every_replica_merge_into_one_exposition() -> None:
    text = b'# HELP x_total X.\n# TYPE x_total counter\nx_total{model="m"} 2.0\n'
    merged = merge_metrics([("r1", text), ("r2", text)]).decode()
    assert 'x_total{model="m",replica="r1"} 2.0' in merged
    assert 'x_total{model="m",replica="r2"} 2.0' in merged
    assert merged.count("# TYPE x_total counter") == 1


def test_what_a_replica_sends_for_ray_status_parses_into_its_row() -> None:
    tier = TierStats("disk", TierKind.DISK, quota_bytes=1 << 20, bytes=2048, rows=3,
                     reserved_bytes=0, hits=2, evictions=0, promotions=0, demotions=0)  # fmt: skip
    counters = CounterSnapshot(hits_exact=2, hits_prefix=1, misses=4, saves_cold=3, tiers=(tier,))
    sent = ReplicaStatus(replica="r1", node_id="n1", slot=0, pid=7, tier_roots=("/kvc/n1",),
                         counters=counters.to_dict())  # fmt: skip
    page = json.loads(json.dumps({"replicas": [sent.to_dict()], "errors": []}))
    (row,) = parse_ray_status(page, "http://ray").replicas
    assert (row.replica, row.node_id, row.slot, row.pid) == ("r1", "n1", 0, 7)
    assert (row.hits["exact"], row.hits["prefix"], row.misses) == (2, 1, 4)
    assert (row.saves["cold"], row.total_saves) == (3, 3)
    assert [(t.name, t.kind, t.rows, t.bytes) for t in row.tiers] == [("disk", "disk", 3, 2048)]
    assert (row.running, row.queued, row.models) == (0, 0, ())
