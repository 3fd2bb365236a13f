"""``erllama-py status`` and the REPL's ``replicas()``: a ``/ray/status`` page (built
from this live runtime's own counters and models, in the shape each Ray replica sends)
parsed into typed rows and drawn as a table; a malformed page refused; a server that is
not on Ray named as such, from the CLI and from the REPL attached over HTTP."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import openai
import pytest
from rich.console import Console

from erllama_py.cli import main
from erllama_py.daemon.control_client import ControlError
from erllama_py.daemon.replicas import (
    NotOnRayError,
    ReplicaStatusError,
    fetch_replicas,
    parse_ray_status,
    replicas_table,
)
from erllama_py.repl import Helpers, HttpOnlyControl
from erllama_py.runtime import Runtime


def _replica(rt: Runtime, replica: str, node_id: str, slot: int) -> dict[str, Any]:
    """What `erllama_py.ray.messages.ReplicaStatus.to_dict` sends for a replica running
    `rt`."""
    return {
        "replica": replica,
        "node_id": node_id,
        "slot": slot,
        "pid": 4242 + slot,
        "tier_roots": [str(t.root) for t in rt.config.cache.tiers if t.root],
        "counters": rt.counters().to_dict(),
        "models": [m.to_dict() for m in rt.models()],
    }


def _page(rt: Runtime, errors: tuple[str, ...] = ()) -> Any:
    replicas = [_replica(rt, "r-bbb", "node-b" * 8, 0), _replica(rt, "r-aaa", "node-a" * 8, 1)]
    return json.loads(json.dumps({"replicas": replicas, "errors": list(errors)}))


def _render(table: object) -> str:
    console = Console(file=io.StringIO(), width=240, record=True)
    console.print(table)
    return console.export_text()


def test_a_ray_status_page_parses_into_one_row_per_replica_with_counters_and_queue(
    rt: Runtime, client: openai.OpenAI
) -> None:
    prompt = "The tide pools hold anemones, crabs and small fish. " * 3
    for _ in range(2):  # a miss and a save, then a hit
        client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    page = _page(rt)
    status = parse_ray_status(page, "http://ray:8000")
    counters = page["replicas"][0]["counters"]
    assert [r.replica for r in status.replicas] == ["r-aaa", "r-bbb"]  # by node, then slot
    row = status.replicas[0]
    assert row.node_id == "node-a" * 8 and row.slot == 1 and row.pid == 4243
    assert row.hits == {k[len("hits_") :]: v for k, v in counters.items() if k.startswith("hits_")}
    assert set(row.hits) >= {"exact", "resume", "prefix"}
    assert row.total_hits >= 1 and row.misses == counters["misses"] >= 1
    assert row.total_saves >= 1 and row.saves["cold"] == counters["saves_cold"]
    assert [(t.name, t.kind, t.rows, t.bytes) for t in row.tiers] == [
        (t["name"], t["kind"], t["rows"], t["bytes"]) for t in counters["tiers"]
    ]
    assert sum(t.rows for t in row.tiers) >= 1
    assert row.models == tuple(m.name for m in rt.models())
    assert (row.running, row.queued) == (0, 0)
    assert status.to_dict()["replicas"][1]["replica"] == "r-bbb"


def test_the_table_has_a_row_per_replica_and_a_column_per_tier(rt: Runtime) -> None:
    status = parse_ray_status(_page(rt, errors=("RayActorError: replica gone",)), "http://ray:8000")
    text = _render(replicas_table(status))
    lines = text.splitlines()
    assert "2 replicas at http://ray:8000" in text
    for tier in rt.config.cache.tiers:
        assert f"{tier.name} rows / bytes" in text
    row = status.replicas[0]
    line = next(line for line in lines if "r-aaa" in line)
    assert line.index("r-aaa") < line.index(str(row.pid)) < line.index(f"exact {row.hits['exact']}")
    assert [line for line in lines if "r-bbb" in line]
    assert "no answer: RayActorError: replica gone" in text


@pytest.mark.parametrize(
    ("damage", "where"),
    [
        (lambda p: p["replicas"][0]["counters"].pop("misses"), "replicas[0].counters.misses"),
        (lambda p: p["replicas"][1].update(pid=True), "replicas[1].pid"),
        (
            lambda p: p["replicas"][0]["counters"]["tiers"][0].pop("rows"),
            "replicas[0].counters.tiers[0].rows",
        ),
        (
            lambda p: p["replicas"][0]["models"][0].update(active="2"),
            "replicas[0].models[0].active",
        ),
        (lambda p: p.pop("replicas"), "page.replicas"),
    ],
)
def test_a_malformed_page_is_refused_naming_the_field(rt: Runtime, damage: Any, where: str) -> None:
    page = _page(rt)
    damage(page)
    with pytest.raises(ReplicaStatusError, match=re.escape(f"/ray/status: {where} ")):
        parse_ray_status(page, "http://ray:8000")


def test_a_server_not_on_ray_says_so_from_the_cli_and_the_repl(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(NotOnRayError, match="is not a Ray Serve deployment"):
        fetch_replicas(url)
    assert main(["status", "--url", url]) == 0
    out = capsys.readouterr().out
    assert f"the server at {url} is not a Ray Serve deployment" in out
    assert main(["status", "--url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"url": url, "ray": False}

    console = Console(file=io.StringIO(), width=240, record=True)
    repl = Helpers(HttpOnlyControl(url), console, url=url)
    assert repl.replicas() == []
    assert "not a Ray Serve deployment" in console.export_text()
    with pytest.raises(ControlError, match="needs a daemon's control socket"):
        repl.models()
    assert isinstance(repl.complete("tiny", "Hello", max_tokens=2), str)  # over HTTP
