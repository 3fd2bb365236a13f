"""The replicas of a Ray Serve deployment, as ``erllama-py status`` and the REPL's
``replicas()`` show them: read from the ingress's ``GET /ray/status`` over HTTP (no
Ray import: the core never needs the extra), parsed into typed rows, drawn as a table.

A server that is not on Ray answers that page with 404; `fetch_replicas` turns that
into `NotOnRayError`, whose message says so and where a single runtime's counters are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rich.table import Table

from erllama_py.daemon.http_client import HttpClientError, get_json
from erllama_py.daemon.units import format_size

__all__ = [
    "NotOnRayError",
    "RayStatus",
    "ReplicaRow",
    "ReplicaStatusError",
    "TierUse",
    "fetch_replicas",
    "parse_ray_status",
    "replicas_table",
]

STATUS_PATH = "/ray/status"
STATUS_TIMEOUT_S = 60.0  # the ingress waits up to 30 s for every replica


class ReplicaStatusError(HttpClientError):
    """The ``/ray/status`` page is not what an erllama-py ingress sends."""


class NotOnRayError(HttpClientError):
    """The server answers, but is not a Ray Serve deployment (no ``/ray/status``)."""


@dataclass(frozen=True)
class TierUse:
    """One cache tier of one replica: its rows, bytes and hits."""

    name: str
    kind: str
    rows: int
    bytes: int
    quota_bytes: int
    hits: int


@dataclass(frozen=True)
class ReplicaRow:
    """One replica: where it runs, its cache counters and its queue (all its models)."""

    replica: str
    node_id: str
    slot: int
    pid: int
    hits: dict[str, int]  # by kind: exact, resume, prefix, longest_prefix
    misses: int
    saves: dict[str, int]  # by reason: cold, continued, finish, evict, shutdown
    tiers: tuple[TierUse, ...]
    running: int
    queued: int
    models: tuple[str, ...]

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    @property
    def total_saves(self) -> int:
        return sum(self.saves.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RayStatus:
    """Every replica that answered, and the ingress's errors for those that did not."""

    url: str
    replicas: tuple[ReplicaRow, ...]
    errors: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "replicas": [r.to_dict() for r in self.replicas],
                "errors": list(self.errors)}  # fmt: skip


def _field(obj: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = obj.get(name)
    # bool is an int to Python, never a counter here
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ReplicaStatusError(
            f"{STATUS_PATH}: {where}.{name} should be {kind.__name__}, got {value!r}"
        )
    return value


def _tier(raw: Any, where: str) -> TierUse:
    if not isinstance(raw, dict):
        raise ReplicaStatusError(f"{STATUS_PATH}: {where} should be an object, got {raw!r}")
    return TierUse(
        name=_field(raw, "name", str, where),
        kind=_field(raw, "kind", str, where),
        rows=_field(raw, "rows", int, where),
        bytes=_field(raw, "bytes", int, where),
        quota_bytes=_field(raw, "quota_bytes", int, where),
        hits=_field(raw, "hits", int, where),
    )


def _prefixed(counters: dict[str, Any], prefix: str, where: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in counters:
        if name.startswith(prefix):
            out[name[len(prefix) :]] = _field(counters, name, int, where)
    return out


def _replica(raw: Any, index: int) -> ReplicaRow:
    where = f"replicas[{index}]"
    if not isinstance(raw, dict):
        raise ReplicaStatusError(f"{STATUS_PATH}: {where} should be an object, got {raw!r}")
    counters = _field(raw, "counters", dict, where)
    models = _field(raw, "models", list, where)
    running = queued = 0
    names: list[str] = []
    for m, model in enumerate(models):
        if not isinstance(model, dict):
            raise ReplicaStatusError(f"{STATUS_PATH}: {where}.models[{m}] should be an object")
        names.append(_field(model, "name", str, f"{where}.models[{m}]"))
        running += _field(model, "active", int, f"{where}.models[{m}]")
        queued += _field(model, "pending_len", int, f"{where}.models[{m}]")
    tiers = _field(counters, "tiers", list, f"{where}.counters")
    hits = _prefixed(counters, "hits_", f"{where}.counters")
    if not hits:
        raise ReplicaStatusError(f"{STATUS_PATH}: {where}.counters has no hits_* counters")
    return ReplicaRow(
        replica=_field(raw, "replica", str, where),
        node_id=_field(raw, "node_id", str, where),
        slot=_field(raw, "slot", int, where),
        pid=_field(raw, "pid", int, where),
        hits=hits,
        misses=_field(counters, "misses", int, f"{where}.counters"),
        saves=_prefixed(counters, "saves_", f"{where}.counters"),
        tiers=tuple(_tier(t, f"{where}.counters.tiers[{i}]") for i, t in enumerate(tiers)),
        running=running,
        queued=queued,
        models=tuple(names),
    )


def parse_ray_status(payload: Any, url: str) -> RayStatus:
    """The ``/ray/status`` JSON of the ingress at `url` as typed rows, sorted by node
    and slot.

    Raises:
        ReplicaStatusError: a field is missing or of the wrong type.
    """
    if not isinstance(payload, dict):
        raise ReplicaStatusError(f"{STATUS_PATH}: expected an object, got {type(payload).__name__}")
    replicas = _field(payload, "replicas", list, "page")
    errors = _field(payload, "errors", list, "page")
    rows = sorted((_replica(r, i) for i, r in enumerate(replicas)),
                  key=lambda r: (r.node_id, r.slot, r.replica))  # fmt: skip
    return RayStatus(url=url, replicas=tuple(rows), errors=tuple(str(e) for e in errors))


def fetch_replicas(url: str, api_key: str | None = None) -> RayStatus:
    """The replicas of the Ray Serve deployment at `url` (its ingress's ``/ray/status``).

    Raises:
        NotOnRayError: the server at `url` is not on Ray (it has no ``/ray/status``).
        ReplicaStatusError: the page is malformed.
        HttpClientError: the server is unreachable or failed.
    """
    base = url.rstrip("/")
    try:
        payload = get_json(f"{base}{STATUS_PATH}", api_key, timeout=STATUS_TIMEOUT_S)
    except HttpClientError as exc:
        if exc.status == 404:
            raise NotOnRayError(
                f"the server at {base} is not a Ray Serve deployment (no {STATUS_PATH}); "
                "a single runtime's counters: `erllama-py cache stats`, or counters() in the REPL"
            ) from None
        raise
    return parse_ray_status(payload, base)


def _by_kind(counts: dict[str, int]) -> str:
    return " ".join(f"{k} {v}" for k, v in counts.items() if v) or "0"


def replicas_table(status: RayStatus) -> Table:
    """One row per replica: node and slot, pid, hits by kind, misses, saves by reason,
    rows and bytes per tier, running and queued requests."""
    tier_names: list[str] = []
    for r in status.replicas:
        tier_names += [t.name for t in r.tiers if t.name not in tier_names]
    table = Table(
        "replica", "node", "slot", "pid", "hits", "misses", "saves",
        *(f"{name} rows / bytes" for name in tier_names), "running", "queued",
        title=f"{len(status.replicas)} replicas at {status.url}",
    )  # fmt: skip
    for r in status.replicas:
        tiers = {t.name: t for t in r.tiers}
        cells = [f"{tiers[n].rows} / {format_size(tiers[n].bytes)}" if n in tiers else "-"
                 for n in tier_names]  # fmt: skip
        table.add_row(
            r.replica, r.node_id[:12], str(r.slot), str(r.pid), _by_kind(r.hits),
            str(r.misses), _by_kind(r.saves), *cells, str(r.running), str(r.queued),
        )  # fmt: skip
    if status.errors:
        table.caption = "; ".join(f"no answer: {e}" for e in status.errors)
    return table
