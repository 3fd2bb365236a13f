"""Multi-turn replay against erllama-py on Ray Serve: affinity router vs Ray's default
router vs one runtime with the same total cache.

::

    .venv/bin/python -m bench.ray_replay [--conversations 9] [--turns 5] [--replicas 3]
        [--model default|tiny] [--output DIR] [--dirty]

Many conversations, interleaved, each resending its whole history every turn, over
HTTP (server-sent events, so the time to first token is the client's), against:

- ``affinity``: a local Ray cluster (``ray.cluster_utils.Cluster``) of ``--replicas``
  nodes, one replica per node, each its own runtime and node-local tiers, routed by
  `CacheAffinityRouter`;
- ``default``: the same cluster and replicas under Ray's power-of-two-choices router;
- ``single``: one ``erllama-py serve`` runtime whose RAM tier is the replicas' together.

Every configuration starts with empty caches (its own roots) and replays its own
conversations (salted), sequentially: one request in flight, so the per-replica
load is the same (at most one) everywhere. Read *from cache* (cached prompt tokens /
prompt tokens, turns 2+; goal: affinity >= single) and *TTFT p50, turns 2+* (goal:
affinity within 1.5x of single).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx

from bench.common import (
    command_line,
    header,
    median,
    model_path,
    percentile,
    require_committed,
    result_options,
    table,
    text,
    write_result,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "ray"))  # the suite's cluster and config helpers

RAM_MB_PER_REPLICA = 64


@dataclass
class Turn:
    conversation: int
    turn: int
    replica: str
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int


def _one(
    client: httpx.Client, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[str, float, int, int, str]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft = float("nan")
    answer: list[str] = []
    usage: dict[str, Any] = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        replica = response.headers.get("x-erllama-replica", "single")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece is not None:
                    if math.isnan(ttft):  # the first token
                        ttft = (time.perf_counter() - started) * 1000.0
                    answer.append(piece)
            usage = event.get("usage") or usage
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return replica, ttft, usage.get("prompt_tokens", 0), cached, "".join(answer)


def replay(
    url: str, model: str, *, conversations: int, turns: int, salt: str, max_tokens: int
) -> list[Turn]:
    histories = [
        [
            {"role": "system", "content": text(f"{salt}-system-{c}", 120)},
            {"role": "user", "content": text(f"{salt}-q-{c}-0", 20)},
        ]
        for c in range(conversations)
    ]
    out: list[Turn] = []
    with httpx.Client(base_url=url, timeout=300.0) as client:
        for turn in range(turns):
            for c, messages in enumerate(histories):
                replica, ttft, prompt, cached, answer = _one(client, model, messages, max_tokens)
                out.append(Turn(c, turn, replica, ttft, prompt, cached))
                messages += [
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": text(f"{salt}-q-{c}-{turn + 1}", 20)},
                ]
    return out


def summary(name: str, turns: list[Turn]) -> list[object]:
    later = [t for t in turns if t.turn > 0]
    share = sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later))
    spread = [
        len({t.replica for t in later if t.conversation == c})
        for c in sorted({t.conversation for t in later})
    ]
    ttfts = [t.ttft_ms for t in later]
    return [
        name,
        f"{share:.1%}",
        f"{median(ttfts):.1f}",
        f"{percentile(ttfts, 0.9):.1f}",
        f"{sum(spread) / max(1, len(spread)):.2f}",
        len({t.replica for t in turns}),
    ]


def run_cluster(args: argparse.Namespace, model: Path, root: Path) -> dict[str, list[Turn]]:
    import ray
    from ray import serve
    from ray_helpers import free_port, ray_config, start_cluster

    from erllama_py.config import load_config
    from erllama_py.ray import serve_on_ray

    cluster = start_cluster(args.replicas)
    port = free_port()
    results: dict[str, list[Turn]] = {}
    try:
        for router in ("affinity", "default"):
            raw = ray_config(
                root / router,
                model,
                replicas=args.replicas,
                router=router,
                ram_mb=RAM_MB_PER_REPLICA,
                n_ctx=args.n_ctx,
            )
            raw["models"][0]["tier"] = "ram"
            raw["models"][0]["n_threads"] = args.threads
            raw["ray"]["affinity_block_chars"] = 256
            serving = serve_on_ray(load_config(raw), port=port)
            results[router] = replay(
                serving.url,
                "tiny",
                conversations=args.conversations,
                turns=args.turns,
                salt=router,
                max_tokens=args.max_tokens,
            )
            serve.delete(serving.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return results


def run_single(args: argparse.Namespace, model: Path, root: Path) -> list[Turn]:
    from ray_helpers import ray_config

    from erllama_py.config import load_config
    from erllama_py.server.serve import start_serving

    raw = ray_config(
        root / "single",
        model,
        replicas=1,
        ram_mb=RAM_MB_PER_REPLICA * args.replicas,
        n_ctx=args.n_ctx,
    )
    raw["models"][0]["tier"] = "ram"
    raw["models"][0]["n_threads"] = args.threads
    raw["cache"]["tiers"][1]["root"] = str(root / "single" / "kvc")
    raw["server"] = {"port": 0}
    serving = start_serving(load_config(raw))
    try:
        return replay(
            serving.url,
            "tiny",
            conversations=args.conversations,
            turns=args.turns,
            salt="single",
            max_tokens=args.max_tokens,
        )
    finally:
        serving.stop()


def describe(args: argparse.Namespace) -> str:
    total = RAM_MB_PER_REPLICA * args.replicas
    return (
        f"{args.conversations} conversations x {args.turns} turns, interleaved, "
        f"history resent, {args.max_tokens} new tokens per turn, one request in flight; "
        f"{args.replicas} replicas (one per node of a local `ray.cluster_utils.Cluster`) "
        f"with {RAM_MB_PER_REPLICA} MB of RAM tier each, against one runtime with "
        f"{total} MB. Model: {args.model}, {args.threads} llama.cpp thread(s) per replica "
        "and in the single runtime. The machine has 2 cores shared with other jobs."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=9)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per replica")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument(
        "--model",
        choices=("default", "tiny"),
        default="default",
        help="gemma-3-270m (default) or the tests' tiny random-weight GGUF",
    )
    result_options(parser)
    args = parser.parse_args()
    require_committed(args.dirty)
    with tempfile.TemporaryDirectory(prefix="erllama-ray-bench-") as tmp:
        root = Path(tmp)
        if args.model == "tiny":
            from erllama_py.model.testmodel import write_test_model

            model = write_test_model(root / "tiny.gguf", seed=0)
        else:
            model = model_path()
        single = run_single(args, model, root)
        cluster = run_cluster(args, model, root)
    rows = [
        summary("affinity router", cluster["affinity"]),
        summary("Ray default router", cluster["default"]),
        summary("single runtime, same total cache", single),
    ]
    ttft = {
        name: median([t.ttft_ms for t in turns if t.turn > 0])
        for name, turns in (("affinity", cluster["affinity"]), ("single", single))
    }
    body = "\n".join(
        [
            header(
                "Multi-turn replay on Ray Serve",
                command_line("ray_replay"),
                dirty_ok=args.dirty,
                model=args.model == "default",
            ),
            "",
            describe(args),
            "",
            table(
                [
                    "configuration",
                    "from cache, turns 2+",
                    "TTFT p50 ms, turns 2+",
                    "TTFT p90 ms",
                    "replicas per conversation",
                    "replicas used",
                ],
                rows,
            ),
            "",
            f"TTFT p50 affinity / single: {ttft['affinity'] / ttft['single']:.2f} (goal <= 1.5).",
            "",
        ]
    )
    print(body)
    write_result("ray_replay", body, args.output, dirty_ok=args.dirty)


if __name__ == "__main__":
    main()
