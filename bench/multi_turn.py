"""Multi-turn replay: interleaved conversations resending their whole history every turn.

Run from the repository root::

    .venv/bin/python -m bench.multi_turn [--conversations 4] [--turns 6] [--words 700]

Four conversations share a ~700-word context in their first user message and
differ in their questions; they are replayed interleaved (turn 1 of each, then
turn 2 of each, ...), every turn sending the whole history plus a new short
question, greedy, 16 new tokens per turn, as a chat client does:

- ours: ``rt.chat(model, messages, max_tokens=16)`` with the gemma chat
  template (the model has none: the fallback), the default policy of
  sys.yaml (min 64, align 64, no trim), RAM tier;
- the peer, as ``python -m llama_cpp.server --chat_format gemma --cache true
  --cache_type ram`` serves it, in process: one ``Llama(chat_format="gemma")``
  with a ``LlamaRAMCache``, ``create_chat_completion(..., stream=True)``. Its
  cache's byte quota only counts the llama.cpp state, not the 537 MB of
  logits each entry also holds (n_batch x vocabulary floats), so the quota is
  set to keep about 7 entries (the last turn of every conversation) instead
  of the server's 2 GB, which would hold all 24 entries: 13 GB of RAM.

Reported per turn: time to first token (ours: ``timings.ttft_ms``; peer:
first streamed chunk) and the share of prompt tokens that did not have to be
prefilled: ours from ``usage.cached_tokens / usage.prompt_tokens``, the peer's
computed the way its code decides (the longest token prefix shared with the
live context or with a cache entry, whichever it would restore). Goal: at
least 90% of prompt tokens on turns 2 and later come from the cache.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import erllama_py
from bench.common import (
    command_line,
    header,
    llama,
    load,
    median,
    percentile,
    quiet,
    result_options,
    runtime_config,
    table,
    text,
    tier_roots,
    write_result,
)

NAME = "multi_turn"
# The default policy of sys.yaml.
POLICY = {
    "min_tokens": 64,
    "cold_min_tokens": 64,
    "cold_max_tokens": 30000,
    "continued_interval": 512,
    "boundary_trim_tokens": 0,
    "boundary_align_tokens": 64,
    "session_resume_wait_ms": 500,
}
FIRST = [
    "Which places does this text mention most often?",
    "Summarise the text in one sentence.",
    "Who are the people in this text?",
    "What happens near the old mill?",
    "List the buildings named in the text.",
    "What season is it in the text?",
]
FOLLOW_UPS = [
    "Can you say more about that?",
    "Why do you think so?",
    "Give one example from the text.",
    "Now answer in five words.",
    "What would a teacher say about it?",
    "Is there anything surprising in it?",
    "Which detail matters most?",
    "Say it once more, briefly.",
]


def question(conversation: int, turn: int, context: str) -> str:
    if turn == 0:
        return f"{context}\n\nQuestion: {FIRST[conversation % len(FIRST)]}"
    return FOLLOW_UPS[(conversation + turn) % len(FOLLOW_UPS)]


def peer_turn(llm: Any, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import format_gemma

    rendered = format_gemma(messages=messages)
    prompt = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=True, special=True)
    live = Llama.longest_token_prefix(llm._input_ids.tolist(), prompt)
    best = max(
        (Llama.longest_token_prefix(k, prompt) for k in llm.cache.cache_state),
        default=0,
    )
    reused = min(max(live, best), len(prompt) - 1)
    started = time.perf_counter()
    first = None
    parts = []
    with quiet():
        for chunk in llm.create_chat_completion(
            messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True
        ):
            delta = chunk["choices"][0]["delta"]
            if first is None and delta.get("content"):
                first = time.perf_counter()
            parts.append(delta.get("content") or "")
    end = time.perf_counter()
    return {
        "ttft": ((first or end) - started) * 1000.0,
        "wall": (end - started) * 1000.0,
        "share": reused / len(prompt),
        "prompt": len(prompt),
        "text": "".join(parts),
    }


def ours_turn(
    rt: Any, model: str, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    started = time.perf_counter()
    result = rt.chat(model, messages, max_tokens=max_tokens)
    wall = (time.perf_counter() - started) * 1000.0
    usage = result.usage
    return {
        "ttft": float(result.timings.ttft_ms),
        "wall": wall,
        "share": usage.cached_tokens / usage.prompt_tokens,
        "prompt": usage.prompt_tokens,
        "kind": result.cache.kind,
        "text": result.text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--words", type=int, default=700)
    parser.add_argument("--max-tokens", type=int, default=16)
    result_options(parser)
    args = parser.parse_args()
    from llama_cpp.llama_cache import LlamaRAMCache

    top = header(
        "Multi-turn replay: interleaved conversations", command_line(NAME), dirty_ok=args.dirty
    )
    context = text("multi-turn shared context", args.words)
    sides = ("ours", "llama-cpp-python")
    history: dict[str, list[list[dict[str, str]]]] = {
        side: [[] for _ in range(args.conversations)] for side in sides
    }
    records: dict[str, list[list[dict[str, Any]]]] = {
        side: [[] for _ in range(args.conversations)] for side in sides
    }
    with tier_roots(NAME) as roots, erllama_py.start(runtime_config(roots, POLICY)) as rt:
        model = load(rt, "chat", tier="ram")
        llm = llama(chat_format="gemma")
        llm.set_cache(LlamaRAMCache(capacity_bytes=100 << 20))
        for turn in range(args.turns):
            for c in range(args.conversations):
                print(f"turn {turn + 1}, conversation {c + 1}", flush=True)
                for side in sides if (turn + c) % 2 == 0 else reversed(sides):
                    messages = history[side][c]
                    messages.append({"role": "user", "content": question(c, turn, context)})
                    if side == "ours":
                        record = ours_turn(rt, model, messages, args.max_tokens)
                    else:
                        record = peer_turn(llm, messages, args.max_tokens)
                    messages.append({"role": "assistant", "content": record["text"]})
                    records[side][c].append(record)
        llm.close()
    write_result(NAME, top + report(records, args), args.output, dirty_ok=args.dirty)


def share(rs: list[dict[str, Any]]) -> float:
    """Token-weighted share of prompt tokens not prefilled, in percent."""
    weighted = sum(float(r["share"]) * int(r["prompt"]) for r in rs)
    return 100.0 * weighted / max(1, sum(int(r["prompt"]) for r in rs))


def report(records: dict[str, list[list[dict[str, Any]]]], args: argparse.Namespace) -> str:
    ours, peer = records["ours"], records["llama-cpp-python"]
    rows = []
    for turn in range(args.turns):
        o = [conv[turn] for conv in ours]
        p = [conv[turn] for conv in peer]
        rows.append(
            [
                turn + 1,
                f"{median([r['prompt'] for r in o]):.0f}",
                f"{median([r['ttft'] for r in o]):.0f}",
                f"{share(o):.1f}%",
                ", ".join(sorted({r["kind"] for r in o})),
                f"{median([r['ttft'] for r in p]):.0f}",
                f"{share(p):.1f}%",
            ]
        )
    later_o = [r for conv in ours for r in conv[1:]]
    later_p = [r for conv in peer for r in conv[1:]]

    def ttft(rs: list[dict[str, Any]]) -> str:
        values = [r["ttft"] for r in rs]
        return f"{median(values):.0f} / {percentile(values, 0.95):.0f}"

    summary = [
        ["share of prompt tokens from the cache, turns 2+", f"{share(later_o):.1f}%",
         f"{share(later_p):.1f}%", ">= 90% (ours)"],
        ["time to first token, turns 2+, median / p95 (ms)", ttft(later_o), ttft(later_p), "-"],
        ["time to first token, turn 1, median (ms)",
         f"{median([c[0]['ttft'] for c in ours]):.0f}",
         f"{median([c[0]['ttft'] for c in peer]):.0f}", "-"],
        ["whole turn (wall), turns 2+, median (ms)",
         f"{median([r['wall'] for r in later_o]):.0f}",
         f"{median([r['wall'] for r in later_p]):.0f}", "-"],
    ]  # fmt: skip
    same = sum(
        1
        for co, cp in zip(ours, peer, strict=True)
        for ro, rp in zip(co, cp, strict=True)
        if ro["text"] == rp["text"]
    )
    total = sum(len(c) for c in ours)
    return "\n".join(
        [
            f"{args.conversations} conversations x {args.turns} turns, interleaved, "
            f"{args.words}-word shared context in the first message, {args.max_tokens} new "
            "tokens per turn, greedy. Per turn: medians over the conversations; shares are "
            "token-weighted.",
            "",
            table(
                [
                    "turn",
                    "prompt tokens",
                    "ours ttft ms",
                    "ours from cache",
                    "ours hit kinds",
                    "peer ttft ms",
                    "peer reused",
                ],
                rows,
            ),
            "",
            table(["figure", "ours", "llama-cpp-python", "goal"], summary),
            "",
            f"Replies identical on both sides (each side replays its own history): "
            f"{same} of {total} turns.",
        ]
    )


if __name__ == "__main__":
    main()
