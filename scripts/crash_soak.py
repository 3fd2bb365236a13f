"""Crash soak: SIGKILL a runtime that saves to every tier, again and again, and check
that each restart serves nothing corrupt or foreign and leaves no temporary file.

    .venv/bin/python scripts/crash_soak.py --iterations 1000          # tiny llama models
    .venv/bin/python scripts/crash_soak.py --iterations 50 --model stub

Not part of ``make test`` (tests/runtime/test_crash_soak.py runs a short version).

The parent first computes each prompt's cold, greedy output on a runtime that saves
nothing (the reference). Each iteration then starts a *child* runtime on the same
``ram_file`` and ``disk`` roots (plus a RAM tier), with three models on one GGUF, one
saving to each tier (one namespace: they share rows), and two on another GGUF (other
weights, another namespace, the same prompts: a row of one family restored into the
other would show as an exact hit unlike the cold run). The child reports when it is up,
with the temporary files it finds in the roots after its startup scan (must be 0), then
runs random prompts from the set (fresh ones, and continuations of earlier outputs, which
resume from finish saves), printing each result. The parent SIGKILLs it at a random
moment (mostly mid-work, sometimes while it starts; each temp file is held open
``--write-delay-ms`` before its sync and link, so that many kills land mid-publish) and
checks every result it printed:

- an exact hit must equal the prompt's cold output (a corrupt, partial or foreign
  payload that was restored would not);
- a cold run must equal it too (sanity);
- a prefix or parent hit may differ on a near-tie (DESIGN.md, Numerics): counted only.

A final child runs every prompt once more, checks the index against the tiers
(``cache.check()``) and fetches every row (each is verified), then stops normally. The
summary goes to stdout; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_TOKENS = 6
N_PROMPTS = 12
TIERS = ("ram", "ram_file", "disk")
FAMILIES = ("a", "b")
# Family a saves to every tier; family b (other weights) shares the tiers, so that a row
# of one restored into the other (a foreign payload) would show in the outputs.
MODELS = (("a", "ram"), ("a", "ram_file"), ("a", "disk"), ("b", "ram"), ("b", "disk"))
READY_TIMEOUT_S = 120.0  # generous: a loaded, shared machine starts three workers slowly


def runtime_config(root: Path, *, tiers: bool = True) -> dict[str, Any]:
    """Small quotas, so that rows are evicted and demoted while the soak runs."""
    cache_tiers: list[dict[str, Any]] = [{"kind": "ram", "quota_mb": 4}]
    if tiers:
        cache_tiers += [
            {"kind": "ram_file", "root": str(root / "ram_file"), "quota_mb": 4},
            {"kind": "disk", "root": str(root / "disk"), "quota_mb": 16},
        ]
    return {
        "cache": {"tiers": cache_tiers},
        "policy": {
            "min_tokens": 4,
            "cold_min_tokens": 4,
            "boundary_trim_tokens": 0,
            "boundary_align_tokens": 1,
        },
        "daemon": {
            "log_file": str(root / "log" / "erllama-py.log"),
            "pid_file": str(root / "erllama-py.pid"),
            "control_socket": str(root / "control.sock"),
        },
    }


def model_options(kind: str, family: str, root: Path) -> dict[str, Any]:
    """Family ``a`` and ``b`` are two models (other weights, so another cache namespace)."""
    options: dict[str, Any] = {"n_ctx": 256, "n_batch": 64, "n_seq_max": 2}
    if kind == "stub":
        options.update(backend="stub", stub={"n_vocab": 300 if family == "a" else 320})
    else:
        options.update(model_path=str(root / f"tiny_{family}.gguf"), n_threads=1)
    return options


def base_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [1] + [rng.randrange(3, 290) for _ in range(rng.randrange(5, 60))] for _ in range(N_PROMPTS)
    ]


def temp_files(root: Path) -> list[str]:
    found = []
    for tier in ("ram_file", "disk"):
        folder = root / tier
        if folder.is_dir():
            found += [str(p) for p in folder.iterdir() if p.name.endswith(".tmp")]
    return found


# ---------------------------------------------------------------------- the runtime side


def reference(root: Path, kind: str, seed: int) -> list[dict[str, Any]]:
    """Cold greedy outputs, per model family, of the base prompts and of their
    continuations (a base prompt, family a's output, one more token)."""
    import erllama_py  # noqa: PLC0415

    rt = erllama_py.start(runtime_config(root / "reference", tiers=False))
    try:
        for family in FAMILIES:
            options = model_options(kind, family, root)
            options["policy"] = {
                "min_tokens": 10**9,
                "cold_min_tokens": 10**9,
                "cold_max_tokens": 10**9,
            }
            rt.load_model(family, **options)

        def cold(prompt: list[int]) -> dict[str, list[int]]:
            return {
                f: rt.complete(f, prompt, max_tokens=MAX_TOKENS, temperature=0.0).tokens
                for f in FAMILIES
            }

        prompts: list[dict[str, Any]] = []
        for prompt in base_prompts(seed):
            out = cold(prompt)
            follow = [*prompt, *out["a"], 5]
            prompts.append({"prompt": prompt, "cold": out})
            prompts.append({"prompt": follow, "cold": cold(follow)})
        if all(p["cold"]["a"] == p["cold"]["b"] for p in prompts):
            raise SystemExit("the two model families agree everywhere: foreign rows undetectable")
        return prompts
    finally:
        rt.stop()


def slow_writes(delay_s: float) -> None:
    """Hold every temp file open (written, not yet synced or linked) for `delay_s`, so
    that kills land mid-publish often: rows are small, writes otherwise take microseconds."""
    from erllama_py.cache import filestore  # noqa: PLC0415

    write_all = filestore.write_all

    def slow(fd: int, buffers: list[Any]) -> int:
        written = write_all(fd, buffers)
        time.sleep(delay_s)
        return written

    filestore.write_all = slow  # type: ignore[assignment]


def child(
    root: Path, kind: str, prompts_file: Path, seed: int, *, final: bool, write_delay_s: float
) -> int:
    import erllama_py  # noqa: PLC0415

    if write_delay_s > 0 and not final:
        slow_writes(write_delay_s)

    prompts = json.loads(prompts_file.read_text())
    rt = erllama_py.start(runtime_config(root))
    try:
        for family, tier in MODELS:
            rt.load_model(f"{family}_{tier}", tier=tier, **model_options(kind, family, root))
        counters = rt.counters()
        _emit(
            event="ready",
            temps=temp_files(root),
            swept=counters.temp_files_swept,
            corrupt=counters.corrupt_files,
        )
        rng = random.Random(seed)
        if not final:
            _emit(event="evicted", rows=evict_some(rt, rng))
        order = list(range(len(prompts))) if final else None
        i = 0
        while order is None or i < len(order):
            idx = order[i] if order is not None else rng.randrange(len(prompts))
            family, tier = MODELS[i % len(MODELS)] if order is not None else rng.choice(MODELS)
            result = rt.complete(
                f"{family}_{tier}", prompts[idx]["prompt"], max_tokens=MAX_TOKENS, temperature=0.0
            )
            _emit(
                event="result",
                idx=idx,
                family=family,
                hit=str(result.cache.kind),
                tokens=result.tokens,
            )
            i += 1
        rt.cache.wait_idle()
        problems = rt.cache.check()
        unreadable = [
            row.key
            for row in rt.cache_rows()
            if row.status == "available" and rt.cache.fetch(row.key) is None
        ]
        counters = rt.counters()
        _emit(
            event="final",
            problems=problems,
            unreadable=len(unreadable),
            corrupt=counters.corrupt_files,
        )
    finally:
        rt.stop()
    return 0


def evict_some(rt: Any, rng: random.Random) -> int:
    """Evict part of a random choice of tiers, so that this child saves again (a fixed
    prompt set is soon all cached, and a runtime that only restores is killed mid-save
    never). RAM rows evicted are demoted to ``ram_file``, ``ram_file``'s to ``disk``:
    publishes the kill can land in too. Returns the rows evicted."""
    sizes: dict[str, int] = {}
    for row in rt.cache_rows():
        sizes[row.tier] = sizes.get(row.tier, 0) + row.size
    evicted = 0
    for tier, size in sorted(sizes.items()):
        if rng.random() < 0.5:
            rows, _freed = rt.cache.evict_bytes(int(size * rng.uniform(0.3, 1.0)), [tier])
            evicted += rows
    return evicted


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------- the parent side


@dataclass
class Tally:
    iterations: int = 0
    kills: int = 0
    kills_during_start: int = 0
    results: int = 0
    exact_hits: int = 0
    exact_mismatches: int = 0
    cold_runs: int = 0
    cold_mismatches: int = 0
    prefix_or_parent_hits: int = 0
    prefix_or_parent_differing: int = 0
    rows_evicted: int = 0
    temp_files_at_kill: int = 0
    temp_files_left: int = 0
    temp_files_swept: int = 0
    corrupt_rows_dropped: int = 0
    child_errors: int = 0
    final_problems: list[str] = field(default_factory=list)

    def check(self, line: dict[str, Any], prompts: list[dict[str, Any]]) -> None:
        if line["event"] == "ready":
            self.temp_files_left += len(line["temps"])
            self.temp_files_swept += line["swept"]
            self.corrupt_rows_dropped += line["corrupt"]
            return
        if line["event"] == "evicted":
            self.rows_evicted += line["rows"]
            return
        if line["event"] == "final":
            self.final_problems += line["problems"]
            if line["unreadable"]:
                self.final_problems.append(f"{line['unreadable']} rows could not be fetched")
            self.corrupt_rows_dropped += line["corrupt"]
            return
        self.results += 1
        same = line["tokens"] == prompts[line["idx"]]["cold"][line["family"]]
        if line["hit"] == "exact":
            self.exact_hits += 1
            self.exact_mismatches += not same
        elif line["hit"] == "cold":
            self.cold_runs += 1
            self.cold_mismatches += not same
        else:
            self.prefix_or_parent_hits += 1
            self.prefix_or_parent_differing += not same

    @property
    def ok(self) -> bool:
        return not (
            self.exact_mismatches
            or self.cold_mismatches
            or self.temp_files_left
            or self.child_errors
            or self.final_problems
        )


def run_child(
    args: argparse.Namespace,
    root: Path,
    prompts_file: Path,
    seed: int,
    *,
    final: bool,
    kill_after: float | None,
    kill_during_start: bool,
    tally: Tally,
    prompts: list[dict[str, Any]],
    log: Any,
) -> None:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--root",
        str(root),
        "--model",
        args.model,
        "--prompts",
        str(prompts_file),
        "--seed",
        str(seed),
        "--write-delay-ms",
        str(args.write_delay_ms),
    ]
    if final:
        cmd.append("--final")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    started = time.monotonic()
    ready_at: float | None = None
    deadline = started + (
        kill_after if kill_during_start and kill_after is not None else READY_TIMEOUT_S
    )
    buffer = ""
    killed = False
    while True:
        now = time.monotonic()
        if not final and ready_at is not None and kill_after is not None and not kill_during_start:
            deadline = ready_at + kill_after
        if not final and now >= deadline:
            proc.send_signal(signal.SIGKILL)
            killed = True
            if ready_at is None and not kill_during_start:
                tally.child_errors += 1  # it never came up
            break
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, min(0.05, deadline - now)))
        if not ready:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(proc.stdout.fileno(), 65536).decode()
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for text in lines:
            line = json.loads(text)
            if line["event"] == "ready":
                ready_at = time.monotonic()
            tally.check(line, prompts)
    proc.wait()
    proc.stdout.close()
    if killed:
        tally.temp_files_at_kill += len(temp_files(root))  # the next start must sweep them
        tally.kills += 1
        tally.kills_during_start += kill_during_start
    elif proc.returncode != 0:
        tally.child_errors += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--model", choices=("tiny", "stub"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-kill-ms", type=float, default=1500.0, help="latest kill after the child is up"
    )
    parser.add_argument(
        "--write-delay-ms",
        type=float,
        default=20.0,
        help="hold each temp file this long before its sync and link (0: no delay)",
    )
    parser.add_argument(
        "--root", type=Path, help="where the tiers live (default: a new temp folder)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--final", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(
            args.root,
            args.model,
            args.prompts,
            args.seed,
            final=args.final,
            write_delay_s=args.write_delay_ms / 1000.0,
        )

    root = args.root or Path(tempfile.mkdtemp(prefix="erllama-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        from erllama_py.model.testmodel import write_test_model  # noqa: PLC0415

        for n, family in enumerate(FAMILIES):
            write_test_model(root / f"tiny_{family}.gguf", seed=n)
    started = time.monotonic()
    prompts = reference(root, args.model, args.seed)
    prompts_file = root / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    rng = random.Random(args.seed)
    tally = Tally()
    with (root / "children.log").open("a") as log:
        for _ in range(args.iterations):
            during_start = rng.random() < 0.1
            kill_after = rng.uniform(0.0, (3.0 if during_start else args.max_kill_ms / 1000.0))
            run_child(
                args,
                root,
                prompts_file,
                rng.randrange(2**31),
                final=False,
                kill_after=kill_after,
                kill_during_start=during_start,
                tally=tally,
                prompts=prompts,
                log=log,
            )
            tally.iterations += 1
        run_child(
            args,
            root,
            prompts_file,
            0,
            final=True,
            kill_after=None,
            kill_during_start=False,
            tally=tally,
            prompts=prompts,
            log=log,
        )
    seconds = time.monotonic() - started
    print(
        f"crash soak: {args.model} model, {tally.iterations} iterations in {seconds:.0f} s, "
        f"root {root}"
    )
    for name, value in vars(tally).items():
        print(f"  {name}: {value}")
    print(
        "  corrupt or foreign payloads served (exact hits unlike the cold run):",
        tally.exact_mismatches,
    )
    print("PASS" if tally.ok else "FAIL")
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
