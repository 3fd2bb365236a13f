"""Agent replay over HTTP: a long tool preamble resent every turn, erllama-py against
``llama_cpp.server --cache`` in one run.

Run from the repository root::

    .venv/bin/python -m bench.agent_replay [--turns 8] [--agents 1] [--max-tokens 16]
        [--tool-words 260] [--system-words 1900] [--tools text|auto]

A coding agent's traffic: a system prompt plus tool definitions of about
``--preamble`` tokens (gemma-3-270m's tokenizer), a task, then per turn the
agent's previous tool call and its result (a file listing, a file's text, a
test log: 150-300 tokens each) appended, the whole conversation resent, as
agents do. The calls and results are scripted (a replay), so both servers see
exactly the same conversations; every turn streams ``--max-tokens`` greedy
tokens.

- ours: ``erllama-py serve`` (a subprocess) on the model, RAM tier, the
  default policy of sys.yaml;
- the peer: ``python -m llama_cpp.server --chat_format gemma --cache true
  --cache_type ram`` (a subprocess) on the same model and context size.

Both get the same conversation: gemma-3-270m ships no chat template, so our
server renders tools, calls and results through the generic tool prompt of
`erllama_py.model.jinja_chat`; the bench sends that rendering as plain messages
to both (the peer's gemma format has no tool support), so the prompts are the
same, token for token up to the formats' joins (the peer's gemma format drops
system messages, so the bench folds the system prompt into the first user
turn, as llama.cpp's gemma template does for ours), and both generate text.
``--tools auto`` instead sends ours the OpenAI ``tools`` (``tool_choice:
"auto"``), earlier calls as ``tool_calls`` and results as ``role: "tool"``
messages; the model may then start a call, which is generated under the
tools' grammar and streamed as its arguments are generated.

``--agents N`` replays N agents at once, interleaved turn by turn (agent 1's
turn 1, agent 2's turn 1, ..., then every agent's turn 2...): each has its own
task and history of calls and results, and all share the same system prompt
and tool definitions, as several sessions of one coding agent do. The per-turn
figures are then medians over the agents (the cached share: of all their
prompt tokens). The default, one agent, is the replay above.

After both servers stop, the floor of each turn is measured in this process
(`bench.turn_floor`): raw llama.cpp prefilling only the turn's uncached tokens
into a sequence that still holds the rest, then sampling; no server can answer
faster, so ours / floor and peer / floor say how far each is from it.

The two are called alternately, turn by turn, so that other load on the
machine hits both alike. Reported per turn: time to first streamed chunk
(client side, request sent to the first chunk with content), our prompt
tokens and ``usage.prompt_tokens_details.cached_tokens``. Goals: time to first
token on turns 2-8 at most 1/10 of the peer's, and at least 95% of our prompt
tokens on turns 2-8 from the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml

from bench.common import (
    N_BATCH,
    N_THREADS,
    command_line,
    header,
    median,
    model_path,
    result_options,
    table,
    text,
    write_result,
)
from bench.turn_floor import turn_floors
from erllama_py.model.jinja_chat import generic_tool_messages

NAME = "agent_replay"
NAN = float("nan")
POLICY = {  # the default policy of sys.yaml
    "min_tokens": 64,
    "cold_min_tokens": 64,
    "cold_max_tokens": 30000,
    "continued_interval": 512,
    "boundary_trim_tokens": 0,
    "boundary_align_tokens": 1,
    "session_resume_wait_ms": 500,
}
TOOL_NAMES = (
    "read_file", "write_file", "list_directory", "search_code", "run_tests", "run_command",
    "git_diff", "git_log", "open_url", "edit_lines", "find_symbol", "format_code",
)  # fmt: skip


# ---------------------------------------------------------------- the conversation


def _tool(name: str, seed: int, words: int) -> dict[str, Any]:
    rnd = random.Random(f"{name}:{seed}")
    props = {
        f"{name.split('_', maxsplit=1)[0]}_{k}": {
            "type": rnd.choice(["string", "integer", "boolean"]),
            "description": text(f"{name}:{k}:{seed}", words // 6),
        }
        for k in range(4)
    }
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": text(f"{name}:{seed}", words),
            "parameters": {"type": "object", "properties": props, "required": list(props)[:2]},
        },
    }


def preamble(seed: int, tool_words: int, system_words: int) -> tuple[str, list[dict[str, Any]]]:
    """The agent's system prompt and tool definitions."""
    system = "You are a careful coding agent. " + text(f"system:{seed}", system_words)
    return system, [_tool(name, seed, tool_words) for name in TOOL_NAMES]


def scripted_turn(seed: int, turn: int) -> tuple[dict[str, Any], str]:
    """The tool call the agent made after turn `turn`, and the result it got back."""
    name = TOOL_NAMES[turn % len(TOOL_NAMES)]
    arguments = {f"{name.split('_')[0]}_0": f"src/module_{turn}.py", "line": 10 * turn}
    call = {
        "id": f"call{seed:02d}{turn:04d}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }
    return call, text(f"result:{seed}:{turn}", 120 + 40 * (turn % 4))


def conversation(system: str, task: str, seed: int, turns: int) -> list[list[dict[str, Any]]]:
    """The messages of every turn (OpenAI's shape, tool calls and tool results)."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": task},
    ]
    out = [list(messages)]
    for turn in range(1, turns):
        call, result = scripted_turn(seed, turn)
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": result},
        ]
        out.append(list(messages))
    return out


def for_peer(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The peer's gemma chat format drops system messages (gemma has no system role):
    fold them into the first user turn, as llama.cpp's gemma template does for ours."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


# ---------------------------------------------------------------- the servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: the server at {url} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"bench: the server at {url} did not come up in {timeout:.0f} s")


@contextlib.contextmanager
def _process(args: list[str], ready: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait(ready, proc)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def ours(n_ctx: int, workdir: Path) -> Iterator[str]:
    """``erllama-py serve`` on the model (RAM tier), its base URL."""
    port = _free_port()
    config = {
        "cache": {"tiers": [{"kind": "ram", "quota_mb": 4096}], "writers": 2},
        "policy": POLICY,
        "daemon": {"log_file": str(workdir / "erllama-py.log")},
        "server": {"host": "127.0.0.1", "port": port, "request_timeout_s": 900},
        "models": [
            {
                "name": "gemma",
                "model_path": str(model_path()),
                "n_ctx": n_ctx,
                "n_batch": N_BATCH,
                "n_seq_max": 1,
                "n_threads": N_THREADS,
            }
        ],
    }
    path = workdir / "sys.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    args = [sys.executable, "-m", "erllama_py.cli", "serve", "--config", str(path)]
    url = f"http://127.0.0.1:{port}"
    with _process(args, f"{url}/health/ready", workdir / "ours.log"):
        yield url


@contextlib.contextmanager
def peer(n_ctx: int, workdir: Path, cache_mb: int) -> Iterator[str]:
    """``llama_cpp.server`` on the model (``--cache`` with ``cache_mb`` of states when it
    is above 0), its base URL."""
    port = _free_port()
    args = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path()),
        "--model_alias", "gemma", "--n_ctx", str(n_ctx), "--n_batch", str(N_BATCH),
        "--n_ubatch", str(N_BATCH), "--n_threads", str(N_THREADS),
        "--n_threads_batch", str(N_THREADS), "--chat_format", "gemma",
        # As our worker does for a sliding-window model (gemma-3): flash attention off.
        "--flash_attn", "false", "--host", "127.0.0.1", "--port", str(port),
        # Its default (true) keeps n_ctx x n_vocab logits (12.9 GB at 12,288 x 262k) and
        # copies them into every cache entry: with it the server was OOM-killed at turn 2.
        "--logits_all", "false",
    ]  # fmt: skip
    if cache_mb > 0:
        # Its quota counts the llama.cpp states only, not the 537 MB of logits each entry
        # also holds (bench/README.md, multi_turn).
        args += ["--cache", "true", "--cache_type", "ram", "--cache_size", str(cache_mb << 20)]
    url = f"http://127.0.0.1:{port}"
    with _process(args, f"{url}/v1/models", workdir / "peer.log"):
        yield url


# ---------------------------------------------------------------- one turn


def streamed_turn(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Stream one chat completion: time to the first chunk with content, and the usage."""
    started = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] | None = None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"bench: {url} answered {response.status_code}: {response.read()!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if first is None and (delta.get("content") or delta.get("tool_calls")):
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": ((first or end) - started) * 1000.0, "wall": (end - started) * 1000.0,
            "usage": usage}  # fmt: skip


Row = tuple[int, int, int, dict[str, Any], dict[str, Any]]


def replay(
    args: argparse.Namespace, tools: list[dict[str, Any]],
    agents: list[list[list[dict[str, Any]]]], work: Path,
) -> tuple[list[list[Row]], str | None]:  # fmt: skip
    """Every turn of every agent on both servers, alternately, the agents interleaved:
    per turn, one (turn, prompt, cached, ours, peer) row per agent; and where the
    peer's server died, if it did (our side then goes on alone)."""
    rows: list[list[Row]] = []
    died: str | None = None
    with (
        ours(args.n_ctx, work) as our_url,
        peer(args.n_ctx, work, args.peer_cache_mb) as peer_url,
        httpx.Client(timeout=900.0) as client,
    ):
        alive: str | None = peer_url
        for turn in range(1, args.turns + 1):
            rows.append([])
            for agent, turns in enumerate(agents, start=1):
                row = _one_turn(
                    args,
                    client,
                    (our_url, alive),
                    tools=tools,
                    turn=turn,
                    turns=turns,
                    work=work,
                )
                rows[-1].append(row)
                prompt, cached, mine, theirs = row[1:]
                who = f"agent {agent} " if len(agents) > 1 else ""
                ttfts = f"ours {mine['ttft']:.0f} ms, peer {theirs['ttft']:.0f} ms"
                print(f"{who}turn {turn}: {prompt} prompt tokens, {cached} cached; {ttfts}",
                      flush=True)  # fmt: skip
                if alive is not None and theirs["ttft"] != theirs["ttft"]:  # the peer died
                    alive = None  # our side goes on alone; the peer's turns stay NaN
                    died = f"agent {agent}, turn {turn}: {theirs['error']}"
    return rows, died


def _one_turn(
    args: argparse.Namespace, client: httpx.Client, urls: tuple[str, str | None], *,
    tools: list[dict[str, Any]], turn: int, turns: list[list[dict[str, Any]]], work: Path,
) -> Row:  # fmt: skip
    our_url, peer_url = urls
    messages = turns[turn - 1]
    base = {"model": "gemma", "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    plain = generic_tool_messages(messages, tools)
    our_body: dict[str, Any] = {
        **base, "messages": plain, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if args.tools == "auto":
        our_body.update(messages=messages, tools=tools, tool_choice="auto")
    mine = streamed_turn(client, our_url, our_body)
    usage = mine["usage"] or {}
    prompt = int(usage.get("prompt_tokens", 0))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    if peer_url is None:
        return (turn, prompt, cached, mine, {"ttft": NAN, "wall": NAN})
    try:
        theirs = streamed_turn(client, peer_url, {**base, "messages": for_peer(plain)})
    except httpx.HTTPError as exc:  # the peer died: say so, keep our figures
        log = (work / "peer.log").read_text(errors="replace")[-2000:]
        print(f"turn {turn}: the peer failed ({exc}); its log ends:\n{log}", flush=True)
        last = [line for line in log.splitlines() if line.strip()][-1:] or ["(empty log)"]
        theirs = {"ttft": NAN, "wall": NAN, "error": f"{exc!r}; its log ends: {last[0][:200]}"}
    return (turn, prompt, cached, mine, theirs)


def per_turn(rows: list[list[Row]]) -> list[Row]:
    """One row per turn: medians over the agents (prompt and cached tokens: sums, so
    that the cached share is of all their prompt tokens)."""
    out: list[Row] = []
    for agents in rows:

        def med(side: int, key: str, agents: list[Row] = agents) -> float:
            return median([r[side][key] for r in agents])

        out.append((
            agents[0][0], sum(r[1] for r in agents), sum(r[2] for r in agents),
            {"ttft": med(3, "ttft"), "wall": med(3, "wall")},
            {"ttft": med(4, "ttft"), "wall": med(4, "wall")},
        ))  # fmt: skip
    return out


def _task(agent: int) -> str:
    if agent == 0:
        return "Fix the failing test in src/module_0.py and explain the change."
    return f"Agent {agent}: fix the failing test in src/module_{agent}.py, then report."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--tool-words", type=int, default=260, help="words per tool description")
    parser.add_argument("--system-words", type=int, default=1900)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--n-ctx", type=int, default=12288)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--agents", type=int, default=1,
                        help="agent conversations replayed at once, interleaved")  # fmt: skip
    parser.add_argument(
        "--peer-cache-mb",
        type=int,
        default=256,
        help="llama_cpp.server --cache_size in MiB; 0 runs it without --cache",
    )
    parser.add_argument("--tools", choices=["text", "auto"], default="text",
                        help="how ours gets the tools (see the module docstring)")  # fmt: skip
    result_options(parser)
    args = parser.parse_args()
    peer_name = (
        f"llama_cpp.server --cache ({args.peer_cache_mb} MiB)"
        if args.peer_cache_mb > 0
        else "llama_cpp.server without --cache (it reuses the prefix its one context holds)"
    )
    head = header(f"Agent replay over HTTP: erllama-py vs {peer_name}",
                  command_line(NAME), dirty_ok=args.dirty)  # fmt: skip
    system, tools = preamble(args.seed, args.tool_words, args.system_words)
    if args.agents < 1:
        parser.error("--agents must be at least 1")
    agents = [
        conversation(system, _task(a), args.seed if a == 0 else args.seed + 1000 * a, args.turns)
        for a in range(args.agents)
    ]
    with tempfile.TemporaryDirectory(prefix="erllama-bench-agent-") as tmp:
        replayed, died = replay(args, tools, agents, Path(tmp))
    print("the floor: raw llama.cpp prefilling each turn's uncached tokens", flush=True)
    counts = [[(turn[a][1], turn[a][2]) for turn in replayed] for a in range(args.agents)]
    by_agent = turn_floors(counts, args.n_ctx)
    floors = [median([f[t] for f in by_agent]) for t in range(len(replayed))]
    rows = per_turn(replayed)
    later = [r for r in rows if r[0] >= 2]
    both = [r for r in later if r[4]["ttft"] == r[4]["ttft"]]  # the peer answered (not NaN)
    ratios = [r[3]["ttft"] / r[4]["ttft"] for r in both] or [NAN]
    ours_floor = [r[3]["ttft"] / floors[r[0] - 1] for r in later]
    peer_floor = [r[4]["ttft"] / floors[r[0] - 1] for r in both] or [NAN]
    share = sum(r[2] for r in later) / max(1, sum(r[1] for r in later))
    over = (
        f" Medians over {args.agents} interleaved agents (prompt and cached tokens: totals)."
        if args.agents > 1
        else ""
    )
    body = [
        head,
        "Time to first streamed chunk per turn (client side), ours with our prompt tokens "
        "and how many came from the cache." + over,
        "",
        table(
            [
                "turn",
                "prompt tokens",
                "cached",
                "cached share",
                "ours TTFT ms",
                "peer TTFT ms",
                "ours / peer",
                "floor ms",
                "ours / floor",
                "peer / floor",
                "ours wall ms",
                "peer wall ms",
            ],
            [
                (
                    t,
                    p,
                    c,
                    f"{c / max(1, p):.1%}",
                    f"{m['ttft']:.0f}",
                    f"{x['ttft']:.0f}",
                    f"{m['ttft'] / x['ttft']:.3f}",
                    f"{floors[t - 1]:.0f}",
                    f"{m['ttft'] / floors[t - 1]:.2f}",
                    f"{x['ttft'] / floors[t - 1]:.2f}",
                    f"{m['wall']:.0f}",
                    f"{x['wall']:.0f}",
                )
                for t, p, c, m, x in rows
            ],
        ),
        "",
        f"- turns 2-{args.turns}: TTFT ours / peer, median of the per-turn ratios: "
        f"**{median(ratios):.3f}** (goal <= 0.1; min {min(ratios):.3f}, max {max(ratios):.3f})",
        f"- turns 2-{args.turns}: prompt tokens from our cache: **{share:.1%}** (goal >= 95%)",
        f"- the floor: raw llama.cpp (a context configured like our worker's, after both "
        "servers stopped) prefilling only each turn's uncached tokens into a sequence that "
        "still holds the rest, and sampling: the least any server can take, with no "
        f"restore at all. Turns 2-{args.turns}, medians: ours / floor "
        f"**{median(ours_floor):.2f}**, peer / floor **{median(peer_floor):.2f}**; "
        "ours / peer <= 0.1 needs the peer at 10 times our distance from the floor",
        f"- preamble (system prompt + {len(tools)} tool definitions) and task: "
        f"{rows[0][1] // args.agents} tokens; tools sent to ours as: {args.tools}; "
        f"{os.cpu_count()} CPUs shared with other jobs",
        *([f"- the peer's server died ({died}); the later turns are ours alone"] if died else []),
    ]
    write_result(NAME, "\n".join(body), args.output, dirty_ok=args.dirty)


if __name__ == "__main__":
    main()
