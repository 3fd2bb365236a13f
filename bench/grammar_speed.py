"""Constrained decoding: ms per token with a json_schema vs the same request unconstrained.

Run from the repository root::

    .venv/bin/python -m bench.grammar_speed [--reps 4] [--tokens 64]

Each repetition streams, on the same prompt (token ids), for the greedy and
the seeded sampler (temperature 0.8, a seed per repetition): ours with
``json_schema`` (`rt.stream`), ours unconstrained, and llama-cpp-python's
``Llama.create_completion`` with the same schema as a ``LlamaGrammar`` (it
applies the grammar to the whole vocabulary on every token: what our fast
path avoids) and without. The four runs of a repetition alternate their
order. ms per token = (last token time - first) / (tokens - 1), so prefill
and time to first token are left out; the unconstrained runs decode as many
tokens as the constrained one did (at most ``--tokens``). Also reports the
grammar compile time, measured apart: llama-cpp-python's schema-to-GBNF
converter and llama.cpp's ``llama_sampler_init_grammar`` on first use, and
the clone of a cached parsed grammar that every later request with the same
schema gets instead. The goal is ours constrained <= 1.3x ours unconstrained.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import llama_cpp as _L
from llama_cpp import LlamaGrammar
from llama_cpp.llama_grammar import json_schema_to_gbnf

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
    text,
    tier_roots,
    write_result,
)

NAME = "grammar_speed"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "animals": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3},
        "count": {"type": "integer"},
        "true_story": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 80},
    },
    "required": ["title", "animals", "count", "true_story", "summary"],
}

PROMPT = (
    "Read the story and reply with a JSON object: its title, the three animals in it, "
    "how many times they meet, whether it is a true story, and a one-sentence summary.\n\n"
)


def _ms_per_token(times: list[float]) -> float:
    return (times[-1] - times[0]) * 1000.0 / (len(times) - 1) if len(times) > 1 else float("nan")


def ours(rt: Any, model: str, tokens: list[int], n: int, **options: Any) -> dict[str, Any]:
    times: list[float] = []
    result: Any = None
    for event in rt.stream(model, tokens, max_tokens=n, **options):
        if event.type == "delta" and event.tokens:
            times.extend([time.perf_counter()] * len(event.tokens))
        elif event.type == "done":
            result = event.completion
    return {
        "ms": _ms_per_token(times),
        "count": len(result.tokens),
        "text": result.text,
        "finish": str(result.finish_reason),
    }


def peer(llm: Any, tokens: list[int], n: int, **options: Any) -> dict[str, Any]:
    llm.reset()
    run = peer_complete(llm, tokens, max_tokens=n, **options)
    count = int(llm.n_tokens) - len(tokens) + 1
    return {"ms": _ms_per_token(run.chunk_times), "count": count, "text": run.text}


def one_rep(
    rt: Any,
    model: str,
    llm: Any,
    tokens: list[int],
    *,
    limit: int,
    sampling: dict[str, Any],
    reverse: bool,
) -> dict[str, dict[str, Any]]:
    """Ours constrained first (the others decode as many tokens as it did), then the rest."""
    schema = json.dumps(SCHEMA)
    grammar = LlamaGrammar.from_json_schema(schema, verbose=False)
    runs = {"ours constrained": ours(rt, model, tokens, limit, json_schema=schema, **sampling)}
    n = runs["ours constrained"]["count"]
    later: list[tuple[str, Any]] = [
        ("ours", lambda: ours(rt, model, tokens, n, **sampling)),
        ("peer constrained", lambda: peer(llm, tokens, limit, grammar=grammar, **sampling)),
        ("peer", lambda: peer(llm, tokens, n, **sampling)),
    ]
    for label, run in reversed(later) if reverse else later:
        runs[label] = run()
    return runs


def _median_ratio(rows: list[dict[str, Any]], mode: str, a: str, b: str) -> str:
    return f"{median([r[a]['ms'] / r[b]['ms'] for r in rows if r['mode'] == mode]):.2f}"


def compile_times(llm: Any, reps: int) -> dict[str, float]:
    """Milliseconds: schema -> GBNF, GBNF -> parsed grammar, and a clone of a parsed one."""
    schema = json.dumps(SCHEMA)
    vocab = _L.llama_model_get_vocab(llm._model.model)
    convert, parse, clone = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        gbnf = json_schema_to_gbnf(schema)
        t1 = time.perf_counter()
        grammar = _L.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        t2 = time.perf_counter()
        copy = _L.llama_sampler_clone(grammar)
        t3 = time.perf_counter()
        _L.llama_sampler_free(copy)
        _L.llama_sampler_free(grammar)
        convert.append((t1 - t0) * 1000.0)
        parse.append((t2 - t1) * 1000.0)
        clone.append((t3 - t2) * 1000.0)
    return {"convert": median(convert), "parse": median(parse), "clone": median(clone)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    result_options(parser)
    args = parser.parse_args()
    top = header(
        "Constrained decoding: json_schema vs unconstrained, ms per token",
        command_line(NAME),
        dirty_ok=args.dirty,
    )
    schema = json.dumps(SCHEMA)
    rows: list[dict[str, Any]] = []
    with tier_roots(NAME) as roots, erllama_py.start(runtime_config(roots, NO_SAVES)) as rt:
        model = load(rt, "grammar", tier="ram")
        llm = llama()
        compiled = compile_times(llm, 5)
        for rep in range(args.reps):
            tokens = rt.tokenize(model, PROMPT + text(("grammar", rep), 60))
            for mode, sampling in (("greedy", {}), ("seeded", {"temperature": 0.8, "seed": rep})):
                print(f"rep {rep + 1}/{args.reps} {mode}", flush=True)
                runs = one_rep(
                    rt,
                    model,
                    llm,
                    tokens,
                    limit=args.tokens,
                    sampling=sampling,
                    reverse=rep % 2 == 1,
                )
                rows.append({"rep": rep + 1, "mode": mode, **runs})
        llm.close()

    def ratio(r: dict[str, Any], a: str, b: str) -> float:
        return float(r[a]["ms"] / r[b]["ms"])

    body = [
        f"Prompt: {len(PROMPT.split())} words of instructions and a 60-word story; schema: "
        f"`{schema}`. {args.reps} repetitions, greedy and seeded (temperature 0.8); "
        "the four runs of a repetition alternate order. ms per token excludes prefill.",
        "",
        table(
            [
                "rep",
                "sampler",
                "ours constrained ms/tok",
                "ours unconstrained",
                "ratio (goal <= 1.3)",
                "llama-cpp-python constrained",
                "llama-cpp-python unconstrained",
                "its ratio",
                "tokens",
                "valid JSON (ours)",
            ],
            [
                [
                    r["rep"],
                    r["mode"],
                    f"{r['ours constrained']['ms']:.1f}",
                    f"{r['ours']['ms']:.1f}",
                    f"{ratio(r, 'ours constrained', 'ours'):.2f}",
                    f"{r['peer constrained']['ms']:.1f}",
                    f"{r['peer']['ms']:.1f}",
                    f"{ratio(r, 'peer constrained', 'peer'):.2f}",
                    r["ours constrained"]["count"],
                    _verdict(r["ours constrained"]),
                ]
                for r in rows
            ],
        ),
        "",
        table(
            ["figure", "measured", "goal"],
            [
                *[
                    [
                        f"ours constrained / unconstrained, {mode} (median of per-rep ratios)",
                        _median_ratio(rows, mode, "ours constrained", "ours"),
                        "<= 1.3",
                    ]
                    for mode in ("greedy", "seeded")
                ],
                *[
                    [
                        f"llama-cpp-python constrained / unconstrained, {mode}",
                        _median_ratio(rows, mode, "peer constrained", "peer"),
                        "-",
                    ]
                    for mode in ("greedy", "seeded")
                ],
                [
                    "ours unconstrained ms/token, median (min-max)",
                    spread([r["ours"]["ms"] for r in rows]),
                    "-",
                ],
                [
                    "ours constrained ms/token, median (min-max)",
                    spread([r["ours constrained"]["ms"] for r in rows]),
                    "-",
                ],
                [
                    "compile: json_schema_to_gbnf (ms, median of 5)",
                    f"{compiled['convert']:.2f}",
                    "-",
                ],
                ["compile: llama_sampler_init_grammar (ms)", f"{compiled['parse']:.2f}", "-"],
                ["a cached grammar: llama_sampler_clone (ms)", f"{compiled['clone']:.3f}", "-"],
            ],
        ),
        "",
        "Both compile steps run once per schema: the GBNF text is cached per process "
        "and the parsed grammar per context, cloned for each request.",
    ]
    write_result(NAME, top + "\n".join(body), args.output, dirty_ok=args.dirty)


def _verdict(run: dict[str, Any]) -> str:
    if _valid(run["text"]):
        return "yes"
    if run["finish"] == "length":  # the grammar had not reached its end: not a violation
        return f"cut at max_tokens ({run['count']})"
    return "no"


def _valid(value: str) -> bool:
    try:
        obj = json.loads(value, strict=False)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == set(SCHEMA["required"])


if __name__ == "__main__":
    main()
