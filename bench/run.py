"""Run every benchmark, one after the other, each in its own process (``make bench``).

Run from the repository root::

    .venv/bin/python -m bench.run [--only warm_start,decode_speed] [--quick]
                                  [--output DIR] [--dirty]

Each benchmark writes ``bench/results/<name>.md`` (or ``DIR/<name>.md``) and
prints it; this runner adds nothing but the order, a time limit per benchmark
and a summary. With ``--quick`` every benchmark runs with fewer repetitions (a
smoke run: the figures are then too noisy to quote; send them to a scratch
``--output``). ``trie_bench`` only prints, so its output is saved as
``trie_bench.md`` here. ``ray_replay`` (the ``ray`` extra; it starts a local Ray
cluster) runs only when named in ``--only``. Like every benchmark, the runner
refuses to start from a tree with uncommitted changes unless told ``--dirty``
(see bench/common.py).
See bench/README.md for what each benchmark measures and how to read it.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, provenance, require_committed

REPO = Path(__file__).resolve().parents[1]
# (name, arguments of a full run, arguments of a quick run, time limit in seconds)
BENCHMARKS: list[tuple[str, list[str], list[str], int]] = [
    ("warm_start", [], ["--sizes", "512,2000", "--reps", "1", "--warm", "3"], 5400),
    ("warm_path", [], ["--sizes", "512,2000", "--warm", "5"], 1800),
    ("decode_speed", [], ["--reps", "4"], 1800),
    ("warm_floor", [], ["--sizes", "512,2000", "--reps", "5"], 1800),
    ("grammar_speed", [], ["--reps", "1"], 1800),
    ("cobatch", [], ["--reps", "1"], 1800),
    ("save_stall", [], ["--reps", "1", "--tokens", "256"], 3600),
    ("multi_turn", [], ["--conversations", "2", "--turns", "3"], 3600),
    ("prefix_agreement", [], ["--pairs", "6"], 5400),
    ("http_serving", [], ["--quick"], 3600),
    ("cache_io", [], [], 1800),
    ("trie_bench", [], [], 600),
    ("agent_replay", [], ["--turns", "3", "--system-words", "400", "--tool-words", "60"], 3600),
    ("ray_replay", [], ["--conversations", "4", "--turns", "3", "--model", "tiny"], 3600),
]
PRINT_ONLY = {"trie_bench"}
# Run only when named in --only: a local multi-node Ray cluster is minutes of start-up
# and needs the ray extra, so a plain `make bench` leaves it out.
OPT_IN = {"ray_replay"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder of the results")
    parser.add_argument(
        "--dirty", action="store_true", help="allow uncommitted changes (the headers say so)"
    )
    args = parser.parse_args()
    wanted = [n for n in args.only.split(",") if n]
    known = [name for name, *_ in BENCHMARKS]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
    args.output = args.output.resolve()  # the benchmarks run from the repository root
    where = require_committed(args.dirty)  # at once, not after half an hour of benchmarks
    passed = ["--output", str(args.output), *(["--dirty"] if args.dirty else [])]
    summary: list[tuple[str, str, float]] = []
    for name, full, quick, limit in BENCHMARKS:
        if (wanted and name not in wanted) or (not wanted and name in OPT_IN):
            continue
        if importlib.util.find_spec(f"bench.{name}") is None:
            summary.append((name, "absent", 0.0))
            continue
        if name in OPT_IN and importlib.util.find_spec("ray") is None:
            summary.append((name, "absent (needs the ray extra)", 0.0))
            continue
        command = [sys.executable, "-m", f"bench.{name}", *(quick if args.quick else full)]
        if name not in PRINT_ONLY:
            command += passed
        print(f"\n=== {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        try:
            if name in PRINT_ONLY:
                done = subprocess.run(
                    command, cwd=REPO, timeout=limit, capture_output=True, text=True, check=False
                )
                code = done.returncode
                print(done.stdout, end="")
                print(done.stderr, end="", file=sys.stderr)
                if code == 0 and provenance() != where and not args.dirty:
                    code = 1
                    print(f"the tree changed during {name}: its result is not written")
                elif code == 0:
                    args.output.mkdir(parents=True, exist_ok=True)
                    (args.output / f"{name}.md").write_text(
                        f"# {name}\n\n- command: `.venv/bin/python -m bench.{name}`\n"
                        f"{where.line()}\n\n```\n{done.stdout.rstrip()}\n```\n",
                        encoding="utf-8",
                    )
            else:
                code = subprocess.run(command, cwd=REPO, timeout=limit, check=False).returncode
            status = "ok" if code == 0 else f"failed ({code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit} s"
        summary.append((name, status, time.monotonic() - started))
    print("\n=== summary")
    for name, status, seconds in summary:
        print(f"{name:18} {status:24} {seconds:7.0f} s")
    if any(status != "ok" and not status.startswith("absent") for _, status, _ in summary):
        sys.exit(1)


if __name__ == "__main__":
    main()
