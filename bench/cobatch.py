"""Co-batched decoding: N concurrent greedy streams vs raw llama.cpp decoding N sequences at once.

Run from the repository root::

    .venv/bin/python -m bench.cobatch [--streams 1,2,4,8] [--tokens 48] [--reps 3]

The raw figure, in this process and the same run: a llama.cpp context
configured like our worker's (bench.warm_floor.RawContext, n_seq_max 8)
prefills N short prompts, then decodes one token of each of the N sequences
per ``llama_decode`` and picks each next token by argmax from its row, for
``--tokens`` steps: aggregate tokens/s = N x steps / time. Ours: N threads
each streaming the same prompts through ``rt.stream`` (greedy,
``max_tokens=--tokens``) on one model with n_seq_max 8, started together;
aggregate tokens/s = all tokens after each stream's first / (the last token
of any stream - the first token of any), and each stream's own rate. The
two sides alternate per repetition. Goal: ours >= 0.9 x raw for N = 2, 4, 8,
no stream starved.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import erllama_py
from bench.common import (
    NO_SAVES,
    command_line,
    header,
    load,
    median,
    result_options,
    runtime_config,
    spread,
    table,
    tier_roots,
    tokens_of,
    write_result,
)
from bench.warm_floor import RawContext

NAME = "cobatch"
N_SEQ_MAX = 8


def raw_run(raw: RawContext, prompts: list[list[int]], steps: int) -> float:
    """Aggregate tokens/s of raw batched decoding of len(prompts) sequences."""
    n = len(prompts)
    for seq in range(N_SEQ_MAX):
        raw.clear(seq)
    start = [0] * N_SEQ_MAX
    rows = raw.decode(list(enumerate(prompts)), start)
    nxt = [raw.argmax(r) for r in rows]
    t0 = time.perf_counter()
    for _ in range(steps):
        rows = raw.decode([(seq, [nxt[seq]]) for seq in range(n)], start)
        nxt = [raw.argmax(r) for r in rows]
    return n * steps / (time.perf_counter() - t0)


def ours_run(rt: Any, model: str, prompts: list[list[int]], n_tokens: int) -> dict[str, Any]:
    times: list[list[float]] = [[] for _ in prompts]
    barrier = threading.Barrier(len(prompts))

    def stream(i: int) -> None:
        barrier.wait()
        for event in rt.stream(model, prompts[i], max_tokens=n_tokens):
            if event.type == "delta" and event.tokens:
                times[i].extend([time.perf_counter()] * len(event.tokens))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = min(t[0] for t in times)
    last = max(t[-1] for t in times)
    total = sum(len(t) - 1 for t in times)
    per = [(len(t) - 1) / (t[-1] - t[0]) for t in times]
    return {"aggregate": total / (last - first), "per": per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    result_options(parser)
    args = parser.parse_args()
    top = header("Co-batched decoding vs raw llama.cpp", command_line(NAME), dirty_ok=args.dirty)
    rows: list[list[object]] = []
    with tier_roots(NAME) as roots, erllama_py.start(runtime_config(roots, NO_SAVES)) as rt:
        model = load(rt, NAME, tier="ram", n_seq_max=N_SEQ_MAX)
        raw = RawContext(N_SEQ_MAX)
        for n in (int(s) for s in args.streams.split(",")):
            raws, ours, pers = [], [], []
            for rep in range(args.reps):
                print(f"{n} streams, rep {rep + 1}/{args.reps}", flush=True)
                prompts = [tokens_of(rt, model, args.prompt, (NAME, rep, i)) for i in range(n)]
                if rep % 2:
                    mine = ours_run(rt, model, prompts, args.tokens)
                    floor = raw_run(raw, prompts, args.tokens - 1)
                else:
                    floor = raw_run(raw, prompts, args.tokens - 1)
                    mine = ours_run(rt, model, prompts, args.tokens)
                raws.append(floor)
                ours.append(mine["aggregate"])
                pers.extend(mine["per"])
            ratios = [o / r for o, r in zip(ours, raws, strict=True)]
            rows.append(
                [
                    n,
                    spread(raws),
                    spread(ours),
                    f"{median(ratios):.2f}",
                    f"{min(pers):.1f} / {median(pers):.1f} / {max(pers):.1f}",
                ]
            )
        raw.close()
    body = [
        f"Greedy, {args.tokens} tokens per stream after a {args.prompt}-token prompt, "
        f"{args.reps} repetitions alternating sides; tokens/s, median (min-max).",
        "",
        table(
            [
                "streams",
                "raw llama.cpp, one llama_decode per step",
                "ours, N concurrent rt.stream",
                "ours / raw (goal >= 0.9)",
                "ours per stream tok/s (min / median / max)",
            ],
            rows,
        ),
    ]
    write_result(NAME, top + "\n".join(body), args.output, dirty_ok=args.dirty)


if __name__ == "__main__":
    main()
