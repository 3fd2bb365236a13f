"""Cold vs warm time to first token, per tier, next to llama-cpp-python's own caches.

Run from the repository root::

    .venv/bin/python -m bench.warm_start [--sizes 512,2000,3500] [--reps 5] [--warm 5]

For each prompt size and repetition, in one process:

- ours, for each tier (``ram``, ``ram_file`` on /dev/shm, ``disk``): a cold
  ``rt.complete(tokens, max_tokens=1)`` on a prompt never seen, then ``--warm``
  identical calls, which restore the row the cold call saved (an exact hit).
  Each tier has its own model (own cache identity). The file tiers run in a
  second runtime that has no RAM tier: the model's cache path promotes every
  file hit into RAM whatever ``promote_on_hit`` says (a bug, see
  bench/README.md), and without a RAM tier every warm hit is served by the
  file tier being measured. For ``disk`` we also time hits after dropping the
  file's pages from the page cache (``posix_fadvise``);
- the peer: two fresh ``Llama`` objects (same context settings), one with a
  ``LlamaRAMCache``, one with a ``LlamaDiskCache``: the first call of each is
  cold (empty cache), then warm calls after ``llm.reset()`` restore the state
  its cache saved (the disk one gets fewer warm calls: each pickles and
  rewrites a state of hundreds of MB). Times are to the first streamed chunk;
  the peer stores its state synchronously after the first token, which its
  wall time includes.

Cold runs alternate between ours and the peer's, then warm runs alternate, so
that the machine's other load hits both sides alike. Ratios are computed
within each repetition and their median over repetitions is reported.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import erllama_py
from bench.common import (
    command_line,
    drop_page_cache,
    fingerprint,
    header,
    llama,
    load,
    median,
    peer_complete,
    result_options,
    runtime_config,
    spread,
    table,
    tier_roots,
    tokens_of,
    write_result,
)

TIERS = ("ram", "ram_file", "disk")
NAME = "warm_start"


def ours(rt: Any, model: str, tokens: list[int]) -> dict[str, Any]:
    started = time.perf_counter()
    result = rt.complete(model, tokens, max_tokens=1)
    wall = (time.perf_counter() - started) * 1000.0
    return {
        "ttft": float(result.timings.ttft_ms),
        "wall": wall,
        "restore": float(result.timings.restore_ms),
        "kind": result.cache.kind,
        "cached": result.usage.cached_tokens,
    }


def row_path(rt: Any, n_tokens: int, kind: str) -> str | None:
    for row in rt.cache_rows():
        if row.n_tokens == n_tokens and row.kind == kind and row.path:
            return str(row.path)
    return None


@dataclass
class Collected:
    """Everything measured: per (size, series), one entry per repetition."""

    # {"cold": ms, "warm": [ms, ...]}
    samples: dict[tuple[int, str], list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    kinds: dict[tuple[int, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    restore: dict[tuple[int, str], list[float]] = field(default_factory=lambda: defaultdict(list))


def run_rep(
    models: dict[str, tuple[Any, str]], *, size: int, rep: int, n_warm: int, acc: Collected
) -> None:
    """One repetition at one size: cold runs interleaved with the peer's, then warm runs."""
    samples, kinds, restore = acc.samples, acc.kinds, acc.restore
    from llama_cpp.llama_cache import LlamaDiskCache, LlamaRAMCache

    rt_ram, ram_model = models["ram"]
    tokens = {
        series: tokens_of(rt_ram, ram_model, size, ("warm", size, rep, series))
        for series in (*TIERS, "peer ram", "peer disk")
    }
    with tempfile.TemporaryDirectory(prefix="llama-disk-cache-") as folder:
        peers = {"peer ram": llama(), "peer disk": llama()}
        peers["peer ram"].set_cache(LlamaRAMCache(capacity_bytes=16 << 30))
        peers["peer disk"].set_cache(LlamaDiskCache(folder, capacity_bytes=16 << 30))
        try:
            # Cold: ours and the peer's fresh Llama (empty cache) alternate.
            cold: dict[str, Any] = {}
            for series in ("ram", "peer ram", "ram_file", "peer disk", "disk"):
                if series in peers:
                    cold[series] = peer_complete(peers[series], tokens[series], max_tokens=1)
                else:
                    cold[series] = ours(*models[series], tokens[series])
            for runtime, _ in models.values():
                runtime.cache.wait_idle(120.0)
            warm: dict[str, list[Any]] = defaultdict(list)
            for i in range(n_warm):
                for series in ("ram", "ram_file", "disk", "peer ram", "peer disk"):
                    if series in peers:
                        if series == "peer disk" and i >= max(2, n_warm - 2):
                            continue  # each of its warm calls pickles and rewrites the state
                        peers[series].reset()
                        warm[series].append(
                            peer_complete(peers[series], tokens[series], max_tokens=1)
                        )
                    else:
                        warm[series].append(ours(*models[series], tokens[series]))
            path = row_path(models["disk"][0], size, "disk")
            for _ in range(3):
                if path:
                    drop_page_cache(path)
                warm["disk dropped"].append(ours(*models["disk"], tokens["disk"]))
        finally:
            for llm in peers.values():
                llm.set_cache(None)
                llm.close()
    for kind in TIERS:
        for series, key in ((f"ours {kind}", "ttft"), (f"ours {kind} wall", "wall")):
            samples[size, series].append(
                {"cold": cold[kind][key], "warm": [w[key] for w in warm[kind]]}
            )
        kinds[size, kind].update(w["kind"] for w in warm[kind])
        kinds[size, f"{kind} cold"].add(cold[kind]["kind"])
        restore[size, kind] += [w["restore"] for w in warm[kind]]
    samples[size, "ours disk, page cache dropped"].append(
        {"cold": cold["disk"]["ttft"], "warm": [d["ttft"] for d in warm["disk dropped"]]}
    )
    restore[size, "disk dropped"] += [d["restore"] for d in warm["disk dropped"]]
    kinds[size, "disk dropped"].update(
        w["kind"] + ("" if path else " (no file found to drop)") for w in warm["disk dropped"]
    )
    for series, label in (("peer ram", "RAM"), ("peer disk", "disk")):
        samples[size, f"llama-cpp-python {label}"].append(
            {"cold": cold[series].ttft_ms, "warm": [w.ttft_ms for w in warm[series]]}
        )
        samples[size, f"llama-cpp-python {label} wall"].append(
            {"cold": cold[series].total_ms, "warm": [w.total_ms for w in warm[series]]}
        )
    # Cold runs of both sides in this rep, for the cold-path comparison.
    samples[size, "cold ours"].append(
        {"cold": median([cold[k]["ttft"] for k in TIERS]), "warm": [1.0]}
    )
    samples[size, "cold peer"].append(
        {"cold": median([cold[k].ttft_ms for k in peers]), "warm": [1.0]}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,2000,3500")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warm", type=int, default=5)
    result_options(parser)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    top = header(
        "Warm start: time to first token, cold vs warm", command_line(NAME), dirty_ok=args.dirty
    )
    acc = Collected()
    with (
        tier_roots(NAME) as roots,
        erllama_py.start(runtime_config(roots, tiers=["ram"])) as rt_ram,
        erllama_py.start(runtime_config(roots, tiers=["ram_file", "disk"])) as rt_files,
    ):
        models = {
            kind: (rt, load(rt, f"warm-{kind}", tier=kind, fingerprint=fingerprint(f"warm-{kind}")))
            for kind, rt in (("ram", rt_ram), ("ram_file", rt_files), ("disk", rt_files))
        }
        for size in sizes:
            for rep in range(args.reps):
                print(f"size {size} rep {rep + 1}/{args.reps}", flush=True)
                run_rep(models, size=size, rep=rep, n_warm=args.warm, acc=acc)

    write_result(NAME, top + report(sizes, acc, args.reps), args.output, dirty_ok=args.dirty)


def _cold(samples: list[dict[str, Any]]) -> list[float]:
    return [float(s["cold"]) for s in samples]


def _warm(samples: list[dict[str, Any]]) -> list[float]:
    return [median(s["warm"]) for s in samples]


def _ratio(samples: list[dict[str, Any]]) -> float:
    """Median over reps of cold / median(warm) within the rep."""
    return median([float(s["cold"]) / median(s["warm"]) for s in samples])


def _cross(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float:
    """Median over reps of a/b for `key` (``cold``: the value; ``warm``: median of warm runs)."""
    pairs = zip(a, b, strict=False)
    if key == "cold":
        return median([float(x["cold"]) / float(y["cold"]) for x, y in pairs])
    return median([median(x["warm"]) / median(y["warm"]) for x, y in pairs])


def report(sizes: list[int], acc: Collected, reps: int) -> str:
    samples, kinds, restore = acc.samples, acc.kinds, acc.restore
    out = [
        "Time to first token of a 1-token completion on a prompt of N tokens (ms): median "
        f"(min-max) over {reps} repetitions; a repetition's warm time is the median of its warm "
        "calls. Ours: `result.timings.ttft_ms` (submit to first token); the `wall` rows "
        "time the whole `rt.complete` call. Peer: first streamed chunk; its `wall` rows include "
        "the synchronous state save that follows.",
        "",
    ]
    series_order = [
        "ours ram",
        "ours ram_file",
        "ours disk",
        "ours disk, page cache dropped",
        "llama-cpp-python RAM",
        "llama-cpp-python disk",
        "ours ram wall",
        "ours ram_file wall",
        "ours disk wall",
        "llama-cpp-python RAM wall",
        "llama-cpp-python disk wall",
    ]
    rows = []
    for size in sizes:
        for series in series_order:
            s = samples.get((size, series))
            if not s:
                continue
            rows.append([size, series, spread(_cold(s)), spread(_warm(s)), f"{_ratio(s):,.0f}x"])
    out += [table(["tokens", "series", "cold ms", "warm ms", "cold / warm"], rows), ""]

    out += ["## Ratios against the goals", ""]
    goal_rows = []
    for size in sizes:
        ram = samples[size, "ours ram"]
        goal = {512: ">= 250x", 2000: ">= 1,000x"}.get(size, "-")
        goal_rows.append([size, "ours RAM warm vs ours cold", f"{_ratio(ram):,.0f}x", goal])
        for kind in ("ram_file", "disk"):
            goal_rows.append(
                [
                    size,
                    f"ours {kind} warm / ours RAM warm",
                    f"{_cross(samples[size, f'ours {kind}'], ram, 'warm'):.2f}",
                    "<= 2 (disk)" if kind == "disk" else "-",
                ]
            )
        goal_rows.append(
            [
                size,
                "ours disk (page cache dropped) warm / ours RAM warm",
                f"{_cross(samples[size, 'ours disk, page cache dropped'], ram, 'warm'):.2f}",
                "-",
            ]
        )
        cold_peer = samples[size, "llama-cpp-python RAM"]
        goal_rows.append(
            [
                size,
                "ours cold / llama-cpp-python cold (ttft, interleaved)",
                f"{_cross(samples[size, 'cold ours'], samples[size, 'cold peer'], 'cold'):.3f}",
                "<= 1.05",
            ]
        )
        goal_rows.append(
            [
                size,
                "llama-cpp-python RAM-cache warm / ours RAM warm",
                f"{_cross(cold_peer, ram, 'warm'):,.0f}x",
                "-",
            ]
        )
        goal_rows.append(
            [
                size,
                "llama-cpp-python disk-cache warm / ours disk warm",
                f"{_cross(samples[size, 'llama-cpp-python disk'], samples[size, 'ours disk'], 'warm'):,.0f}x",  # noqa: E501
                "-",
            ]
        )
        goal_rows.append(
            [
                size,
                "llama-cpp-python RAM-cache warm vs its cold",
                f"{_ratio(cold_peer):,.1f}x",
                "-",
            ]
        )
    out += [table(["tokens", "ratio", "measured", "goal"], goal_rows), ""]

    out += ["## Where our warm time goes", ""]
    rrows = []
    for size in sizes:
        for kind in (*TIERS, "disk dropped"):
            values = restore.get((size, kind), [])
            hit_kinds = ", ".join(sorted(kinds.get((size, kind), set()))) or "-"
            rrows.append([size, kind, spread(values), hit_kinds])
    out += [
        "`restore_ms` is the cache lookup, claim, load (checksum) and the one worker call"
        " that unpacks the state and samples the first token from its stored logits; the"
        " rest of the warm time to first token is submission, admission and the token's"
        " delivery.",
        "",
        table(["tokens", "tier", "restore ms", "hit kinds seen"], rrows),
        "",
    ]
    cold_kinds = {
        f"{size} {k}": ", ".join(sorted(v)) for (size, k), v in kinds.items() if k.endswith("cold")
    }
    out.append(f"Cold runs' cache kinds (should all be `cold`): {cold_kinds}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
