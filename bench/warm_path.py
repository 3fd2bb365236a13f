"""Warm path, back to back: repeated exact hits on one model with nothing in between.

Run from the repository root::

    .venv/bin/python -m bench.warm_path [--sizes 512,2000,3500] [--warm 30] [--tier ram]

``warm_start`` interleaves our calls with the peer's and with the other tiers,
as requests from several clients would arrive; this one measures the warm
path alone (the worker and its caches hot), to separate what the path costs
from what switching between processes costs on this machine. Per size: one
cold ``rt.complete(tokens, max_tokens=1)``, then ``--warm`` exact hits; the
report gives the median time to first token, the restore part of it, and the
cold / warm ratio.
"""

from __future__ import annotations

import argparse

import erllama_py
from bench.common import (
    command_line,
    fingerprint,
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

NAME = "warm_path"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,2000,3500")
    parser.add_argument("--warm", type=int, default=30)
    parser.add_argument("--tier", default="ram", choices=["ram", "ram_file", "disk"])
    result_options(parser)
    args = parser.parse_args()
    top = header("Warm path, back to back", command_line(NAME), dirty_ok=args.dirty)
    rows = []
    with (
        tier_roots(NAME) as roots,
        erllama_py.start(runtime_config(roots, tiers=["ram", "ram_file", "disk"])) as rt,
    ):
        model = load(rt, NAME, tier=args.tier, fingerprint=fingerprint(NAME))
        for size in (int(s) for s in args.sizes.split(",")):
            tokens = tokens_of(rt, model, size, (NAME, size))
            cold = rt.complete(model, tokens, max_tokens=1)
            assert cold.cache.kind == "cold"
            rt.cache.wait_idle(60.0)
            warm = [rt.complete(model, tokens, max_tokens=1) for _ in range(args.warm)]
            assert all(w.cache.kind == "exact" for w in warm)
            ttft = [w.timings.ttft_ms for w in warm]
            restore = [w.timings.restore_ms for w in warm]
            cold_ms = cold.timings.ttft_ms
            rows.append(
                [
                    size,
                    f"{cold_ms:.0f}",
                    spread(ttft),
                    spread(restore),
                    f"{cold_ms / median(ttft):,.0f}x",
                ]
            )
    body = (
        f"Tier {args.tier}; {args.warm} exact hits after one cold run per size; ms.\n\n"
        + table(["tokens", "cold ttft", "warm ttft", "warm restore", "cold / warm"], rows)
        + "\n"
    )
    write_result(NAME, top + body, args.output, dirty_ok=args.dirty)


if __name__ == "__main__":
    main()
