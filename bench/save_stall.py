"""How much continued saves stall generation: decode tokens/s with saves every N tokens vs off.

Run from the repository root::

    .venv/bin/python -m bench.save_stall [--tokens 512] [--prompt 128] [--reps 3]

One runtime (RAM and disk tiers), one model per configuration, each with its
own cache identity: saves off (``min_tokens`` huge), and continued saves every
16, 64 and 256 tokens into RAM, and every 64 tokens onto disk. Each
repetition streams a greedy generation of ``--tokens`` tokens from a new
prompt on every configuration (the order rotates), timing every token. A
continued save packs the sequence's state between two ticks (the paused-
context invariant) and hands it to the writer pool; the question is what that
costs the generation.

Reported per configuration: the decode rate ((tokens - 1) / span, so the
prefill, the cold save before the first token and the finish save after the
last are left out), the rate from the median gap between tokens (robust to
the machine's other load), the 99th percentile and largest gaps (where a save
shows up), how many continued saves fired, and the mean pack time (from the
``pack_total_ns`` counter). The stall is 1 - rate / rate with saves off,
within a repetition, median over repetitions.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import erllama_py
from bench.common import (
    EXACT_POLICY,
    NO_SAVES,
    command_line,
    fingerprint,
    header,
    load,
    median,
    percentile,
    result_options,
    runtime_config,
    spread,
    table,
    tier_roots,
    tokens_of,
    write_result,
)

NAME = "save_stall"
CONFIGS: dict[str, tuple[str, int | None]] = {
    "saves off": ("ram", None),
    "every 16 tokens, ram": ("ram", 16),
    "every 64 tokens, ram": ("ram", 64),
    "every 256 tokens, ram": ("ram", 256),
    "every 64 tokens, disk": ("disk", 64),
}


def generate(rt: Any, model: str, tokens: list[int], n: int) -> dict[str, Any]:
    before = rt.counters()
    times: list[float] = []
    result: dict[str, Any] = {}
    for event in rt.stream(model, tokens, max_tokens=n):
        if event.type == "delta" and event.tokens:
            times.append(time.perf_counter())
        elif event.type == "done":
            result = event.completion
    rt.cache.wait_idle(120.0)
    after = rt.counters()
    gaps = [(b - a) * 1000.0 for a, b in itertools.pairwise(times)]
    saves = after.saves_continued - before.saves_continued
    pack_ms = (after.pack_total_ns - before.pack_total_ns) / 1e6
    return {
        "rate": (len(times) - 1) / (times[-1] - times[0]),
        "gap_rate": 1000.0 / median(gaps),
        "p99": percentile(gaps, 0.99),
        "max": max(gaps),
        "saves": saves,
        "pack_ms": pack_ms,
        "tokens": result.tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    result_options(parser)
    args = parser.parse_args()
    top = header(
        "Save stall: decode speed with continued saves vs saves off",
        command_line(NAME),
        dirty_ok=args.dirty,
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    same_output: list[bool] = []
    with (
        tier_roots(NAME) as roots,
        erllama_py.start(runtime_config(roots, tiers=["ram", "disk"])) as rt,
    ):
        models = {}
        for i, (name, (tier, interval)) in enumerate(CONFIGS.items()):
            policy = (
                NO_SAVES if interval is None else {**EXACT_POLICY, "continued_interval": interval}
            )
            models[name] = load(
                rt, f"stall-{i}", tier=tier, policy=policy, fingerprint=fingerprint(f"stall-{i}")
            )
        for rep in range(args.reps):
            tokens = tokens_of(rt, models["saves off"], args.prompt, ("stall", rep))
            names = list(CONFIGS)
            order = names[rep % len(names) :] + names[: rep % len(names)]
            outputs = []
            for name in order:
                print(f"rep {rep + 1}/{args.reps}: {name}", flush=True)
                run = generate(rt, models[name], tokens, args.tokens)
                runs[name].append(run)
                outputs.append(run["tokens"])
            same_output.append(all(o == outputs[0] for o in outputs))

    off = runs["saves off"]
    rows = []
    for name, samples in runs.items():
        stall = [1.0 - s["rate"] / o["rate"] for s, o in zip(samples, off, strict=True)]
        gap_stall = [1.0 - s["gap_rate"] / o["gap_rate"] for s, o in zip(samples, off, strict=True)]
        saves = sum(s["saves"] for s in samples)
        pack = sum(s["pack_ms"] for s in samples)
        rows.append(
            [
                name,
                spread([s["rate"] for s in samples]),
                "-" if name == "saves off" else f"{100 * median(stall):.1f}%",
                spread([s["gap_rate"] for s in samples]),
                "-" if name == "saves off" else f"{100 * median(gap_stall):.1f}%",
                f"{median([s['p99'] for s in samples]):.0f}",
                f"{median([s['max'] for s in samples]):.0f}",
                f"{saves / len(samples):.0f}",
                f"{pack / saves:.1f}" if saves else "-",
            ]
        )
    body = [
        f"Greedy generation of {args.tokens} tokens after a {args.prompt}-token prompt, "
        f"{args.reps} repetitions (a new prompt each; every configuration on the same prompt). "
        "Rates in tokens/s, median (min-max) over repetitions; gaps in ms, medians over "
        "repetitions. Goal: saves never stall generation by more than 10%.",
        "",
        table(
            [
                "configuration",
                "tok/s",
                "stall",
                "tok/s by median gap",
                "stall (gap)",
                "p99 gap ms",
                "max gap ms",
                "continued saves per run",
                "pack ms per save",
            ],
            rows,
        ),
        "",
        "Every configuration generated the same tokens as saves off in each repetition: "
        f"{'yes' if all(same_output) else 'no'} ({same_output}).",
    ]
    write_result(NAME, top + "\n".join(body), args.output, dirty_ok=args.dirty)


if __name__ == "__main__":
    main()
