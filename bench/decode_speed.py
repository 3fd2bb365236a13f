"""Decode speed: tokens/s of ours vs llama-cpp-python's `Llama`, same prompt, greedy.

Run from the repository root::

    .venv/bin/python -m bench.decode_speed [--tokens 128] [--prompt 64] [--reps 8]

Each repetition uses a new prompt of ``--prompt`` tokens, given as token ids
to both sides: ``rt.stream(model, tokens, max_tokens=N)`` (one event per
token) and ``Llama.create_completion(tokens, max_tokens=N, temperature=0,
stream=True)`` on a context configured like our worker's. The decode rate is
(tokens - 1) / (time of the last token - time of the first), so prefill and
time to first token are left out; the two sides alternate, first one then the
other. The machine is shared, so a second rate is computed from the median gap
between consecutive tokens, which a few preempted tokens do not move. Saves
are off for ours (the default policy would not save within 128 tokens
anyway). Also reports whether both sides generated the same text: they run
the same kernels on the same tokens, so greedy outputs should agree.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import erllama_py
from bench.common import (
    NO_SAVES,
    command_line,
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

NAME = "decode_speed"


def _gap_rate(times: list[float]) -> float:
    """Tokens/s from the median gap between consecutive tokens (robust to preemption)."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return 1.0 / median(gaps) if gaps else float("nan")


def ours(rt: Any, model: str, tokens: list[int], n: int) -> dict[str, Any]:
    started = time.perf_counter()
    times: list[float] = []
    result: dict[str, Any] = {}
    for event in rt.stream(model, tokens, max_tokens=n):
        if event.type == "delta" and event.tokens:
            times.append(time.perf_counter())
        elif event.type == "done":
            result = event.completion
    count = len(result.tokens)
    return {
        "rate": (count - 1) / (times[-1] - times[0]) if count > 1 else float("nan"),
        "gap_rate": _gap_rate(times),
        "ttft": (times[0] - started) * 1000.0,
        "count": count,
        "text": result.text,
        "decode_ms": float(result.timings.decode_ms),
    }


def peer(llm: Any, tokens: list[int], n: int) -> dict[str, Any]:
    llm.reset()
    run = peer_complete(llm, tokens, max_tokens=n)
    # The last sampled token is not evaluated: the context holds prompt + count - 1.
    count = int(llm.n_tokens) - len(tokens) + 1
    times = run.chunk_times
    return {
        "rate": (count - 1) / (times[-1] - times[0]) if count > 1 else float("nan"),
        "gap_rate": _gap_rate(times),
        "ttft": run.ttft_ms,
        "count": count,
        "text": run.text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--reps", type=int, default=8)
    result_options(parser)
    args = parser.parse_args()
    top = header(
        "Decode speed: tokens/s, ours vs llama-cpp-python", command_line(NAME), dirty_ok=args.dirty
    )
    rows: list[dict[str, Any]] = []
    with tier_roots(NAME) as roots, erllama_py.start(runtime_config(roots, NO_SAVES)) as rt:
        model = load(rt, "decode", tier="ram")
        llm = llama()
        # One unmeasured round each, so that both sides have touched their weights.
        warmup = tokens_of(rt, model, args.prompt, "decode warm-up")
        ours(rt, model, warmup, 8)
        peer(llm, warmup, 8)
        for rep in range(args.reps):
            tokens = tokens_of(rt, model, args.prompt, ("decode", rep))
            print(f"rep {rep + 1}/{args.reps}", flush=True)
            if rep % 2 == 0:
                a, b = ours(rt, model, tokens, args.tokens), peer(llm, tokens, args.tokens)
            else:
                b, a = peer(llm, tokens, args.tokens), ours(rt, model, tokens, args.tokens)
            rows.append({"ours": a, "peer": b})
        llm.close()

    ratios = [r["ours"]["rate"] / r["peer"]["rate"] for r in rows]
    gap_ratios = [r["ours"]["gap_rate"] / r["peer"]["gap_rate"] for r in rows]
    body = [
        f"Greedy decoding of {args.tokens} tokens after a {args.prompt}-token prompt; "
        f"{args.reps} repetitions, a new prompt each, sides alternating. Rate = (tokens - 1) / "
        "(last token time - first token time), so prefill is excluded.",
        "",
        table(
            [
                "rep",
                "ours tok/s",
                "llama-cpp-python tok/s",
                "ours / theirs",
                "by median gap: ours, theirs tok/s",
                "ours / theirs (gap)",
                "tokens (ours, theirs)",
                "same text",
            ],
            [
                [
                    i + 1,
                    f"{r['ours']['rate']:.1f}",
                    f"{r['peer']['rate']:.1f}",
                    f"{ratio:.3f}",
                    f"{r['ours']['gap_rate']:.1f}, {r['peer']['gap_rate']:.1f}",
                    f"{gap:.3f}",
                    f"{r['ours']['count']}, {r['peer']['count']}",
                    "yes" if r["ours"]["text"] == r["peer"]["text"] else "no",
                ]
                for i, (r, ratio, gap) in enumerate(zip(rows, ratios, gap_ratios, strict=True))
            ],
        ),
        "",
        table(
            ["figure", "measured", "goal"],
            [
                [
                    "ours tok/s, median (min-max)",
                    spread([r["ours"]["rate"] for r in rows]),
                    "-",
                ],
                [
                    "llama-cpp-python tok/s, median (min-max)",
                    spread([r["peer"]["rate"] for r in rows]),
                    "-",
                ],
                [
                    "ours / llama-cpp-python (median of per-rep ratios)",
                    f"{median(ratios):.3f}",
                    ">= 0.95",
                ],
                [
                    "ours / llama-cpp-python by median gap (median of per-rep ratios)",
                    f"{median(gap_ratios):.3f}",
                    ">= 0.95",
                ],
                [
                    "ms per token, ours (median)",
                    f"{1000.0 / median([r['ours']['rate'] for r in rows]):.2f}",
                    "-",
                ],
                [
                    "ms per token, llama-cpp-python (median)",
                    f"{1000.0 / median([r['peer']['rate'] for r in rows]):.2f}",
                    "-",
                ],
            ],
        ),
    ]
    write_result(NAME, top + "\n".join(body), args.output, dirty_ok=args.dirty)


if __name__ == "__main__":
    main()
