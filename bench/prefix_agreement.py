"""Prefix hits vs cold runs: how often a prefix hit's greedy continuation equals the cold one.

Run from the repository root::

    .venv/bin/python -m bench.prefix_agreement [--pairs 30] [--continuation 32]

Each pair is a prefix P of 300 to 1,100 tokens and a suffix S of 5 to 200
tokens (log-uniform), given as token ids, so P is exactly a prefix of P + S.
One runtime, RAM tier, n_batch 512, four models on the same GGUF, each with
its own cache identity:

- ``normal``: ``rt.prefill(P)`` saves P's state; then ``rt.complete(P + S)``
  is a prefix hit that restores P and prefills S in one batch;
- ``deterministic``: the same with ``deterministic=True``: the prefill of P
  saves a cold row at P's last multiple of n_batch and one at P's end;
- ``deterministic, boundary row only``: ``deterministic=True`` too, but only
  P cut to its last multiple of n_batch is prefilled (so that the only row is
  the one deterministic mode can use; pairs with P < 512 have none);
- the truth is a cold run of P + S on a model configured like the one under
  test (same save policy, same mode), in a second runtime whose cache is
  emptied before each run: on a sliding-window model a run continues from its
  own saved state at its save points, so a model with saves off is not the
  reference of a model with saves on.

llama.cpp computes batches of fewer than 64 tokens on another kernel path, so
a prefix hit whose suffix is short can differ from the cold run (which
prefilled P's tail and S in one batch) in near-ties. Reported: the share of
pairs whose continuation equals the cold run's, the share among the pairs that
got a hit (a pair without one ran cold twice), the position-wise agreement, the
first divergence, and what deterministic mode costs in restored tokens.
"""

from __future__ import annotations

import argparse
import math
import random
from typing import Any

import erllama_py
from bench.common import (
    EXACT_POLICY,
    N_BATCH,
    command_line,
    fingerprint,
    header,
    load,
    median,
    result_options,
    runtime_config,
    table,
    tier_roots,
    tokens_of,
    write_result,
)

NAME = "prefix_agreement"
MODES = ("normal", "deterministic", "deterministic, boundary row only")


def divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--continuation", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    result_options(parser)
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    top = header(
        "Prefix agreement: prefix hits vs cold runs", command_line(NAME), dirty_ok=args.dirty
    )
    pairs: list[dict[str, Any]] = []
    with (
        tier_roots(NAME) as roots,
        tier_roots(NAME + "-ref") as ref_roots,
        erllama_py.start(runtime_config(roots, tiers=["ram"])) as rt,
        erllama_py.start(runtime_config(ref_roots, tiers=["ram"])) as ref_rt,
    ):
        references = {
            "normal": load(ref_rt, "pa-ref", fingerprint=fingerprint("pa-ref")),
            "deterministic": load(
                ref_rt, "pa-ref-det", deterministic=True, fingerprint=fingerprint("pa-ref-det")
            ),
        }
        models = {
            "normal": load(rt, "pa-normal", fingerprint=fingerprint("pa-normal")),
            "deterministic": load(
                rt, "pa-det", deterministic=True, fingerprint=fingerprint("pa-det")
            ),
            "deterministic, boundary row only": load(
                rt, "pa-det-boundary", deterministic=True, fingerprint=fingerprint("pa-det-b")
            ),
        }
        for i in range(args.pairs):
            n_prefix = rnd.randint(300, 1100)
            n_suffix = round(math.exp(rnd.uniform(math.log(5), math.log(200))))
            tokens = tokens_of(rt, models["normal"], n_prefix + n_suffix, ("pair", args.seed, i))
            prefix = tokens[:n_prefix]
            boundary = n_prefix - n_prefix % N_BATCH
            print(f"pair {i + 1}/{args.pairs}: prefix {n_prefix}, suffix {n_suffix}", flush=True)
            rt.prefill(models["normal"], prefix)
            rt.prefill(models["deterministic"], prefix)
            if boundary >= EXACT_POLICY["min_tokens"]:
                rt.prefill(models["deterministic, boundary row only"], prefix[:boundary])
            rt.cache.wait_idle(60.0)
            record: dict[str, Any] = {"prefix": n_prefix, "suffix": n_suffix}
            colds: dict[str, dict[str, Any]] = {}
            for kind, model in references.items():
                ref_rt.cache.gc()
                colds[kind] = ref_rt.complete(model, tokens, max_tokens=args.continuation)
                assert colds[kind].cache.kind == "cold"
            record["cold_ttft"] = colds["normal"].timings.ttft_ms
            record["references_equal"] = colds["normal"].tokens == colds["deterministic"].tokens
            for mode in MODES:
                cold = colds["normal" if mode == "normal" else "deterministic"]
                hit = rt.complete(models[mode], tokens, max_tokens=args.continuation)
                record[mode] = {
                    "equal": hit.tokens == cold.tokens,
                    "tokens": hit.tokens,
                    "kind": hit.cache.kind,
                    "cached": hit.usage.cached_tokens,
                    "ttft": hit.timings.ttft_ms,
                    "diverge": divergence(hit.tokens, cold.tokens),
                    "agree": sum(
                        1 for x, y in zip(hit.tokens, cold.tokens, strict=False) if x == y
                    ),
                }
            pairs.append(record)
    write_result(NAME, top + report(pairs, args.continuation), args.output, dirty_ok=args.dirty)


def _summary(pairs: list[dict[str, Any]], mode: str, n: int) -> list[str]:
    if not pairs:
        return [mode, "0", "-", "-", "-", "-", "-", "-"]
    equal = sum(1 for p in pairs if p[mode]["equal"])
    positions = sum(p[mode]["agree"] for p in pairs) / (n * len(pairs))
    diverged = [p[mode]["diverge"] for p in pairs if not p[mode]["equal"]]
    hits = [p for p in pairs if p[mode]["kind"] != "cold"]
    # A pair without a hit ran cold twice: its agreement says nothing about hits.
    equal_hits = sum(1 for p in hits if p[mode]["equal"])
    restored = sum(p[mode]["cached"] for p in pairs) / sum(p["prefix"] for p in pairs)
    return [
        mode,
        str(len(pairs)),
        f"{equal} ({100 * equal / len(pairs):.0f}%)",
        f"{100 * positions:.1f}%",
        f"{median(diverged):.0f} (min {min(diverged)})" if diverged else "-",
        f"{len(hits)}",
        f"{equal_hits} of {len(hits)}",
        f"{100 * restored:.0f}%",
    ]


def report(pairs: list[dict[str, Any]], n: int) -> str:
    detail = []
    for i, p in enumerate(pairs):
        row: list[object] = [i + 1, p["prefix"], p["suffix"]]
        for mode in MODES:
            m = p[mode]
            verdict = "=" if m["equal"] else f"differs at {m['diverge']}"
            row.append(f"{m['kind']} {m['cached']}: {verdict}")
        detail.append(row)
    headers = ["subset", "pairs", "continuation == cold", "positions agreeing",
               "first divergence, median", "hits", "hits == cold",
               "prefix tokens restored"]  # fmt: skip
    summary = []
    short = [p for p in pairs if p["suffix"] < 64]
    long = [p for p in pairs if p["suffix"] >= 64]
    for mode in MODES:
        for label, subset in (("all", pairs), ("suffix < 64", short), ("suffix >= 64", long)):
            line = _summary(subset, mode, n)
            line[0] = f"{mode}, {label}"
            summary.append(line)
    ttft = [
        [
            "median time to first token (ms)",
            f"{median([p['cold_ttft'] for p in pairs]):.0f}",
            *(f"{median([p[m]['ttft'] for p in pairs]):.0f}" for m in MODES),
        ]
    ]
    return "\n".join(
        [
            f"{len(pairs)} pairs; greedy continuation of {n} tokens compared with the cold run "
            "of the same prompt (a model configured alike, its cache emptied first). "
            "In the detail, `prefix 812: =` means a prefix hit restoring 812 tokens "
            "whose continuation equals the cold one.",
            "",
            table(headers, summary),
            "",
            f"The two references (normal and deterministic model, both cold) gave the same "
            f"continuation in {sum(p['references_equal'] for p in pairs)} of {len(pairs)} "
            "pairs: on a sliding-window model a cold run's output also depends on where its "
            "saves fell (each save past the window continues from the saved state).",
            "",
            table(["", "cold", *MODES], ttft),
            "",
            "## Every pair",
            "",
            table(["pair", "prefix", "suffix", *MODES], detail),
        ]
    )


if __name__ == "__main__":
    main()
