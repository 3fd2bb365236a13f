"""HTTP serving: ``erllama-py serve`` against ``llama_cpp.server``, both over HTTP, in one run.

Run from the repository root (``make setup`` installs the peer's extra, ``bench``)::

    .venv/bin/python -m bench.http_serving [--quick] [--parts multi_turn,streams,overhead]
                                           [--peers cache,nocache] [--output DIR] [--dirty]

Three servers on free ports, started here and stopped at the end:

- ours: ``erllama-py serve`` on a temporary copy of sys.yaml (its default model,
  gemma-3-270m, with 2 threads; its policy and RAM tier; fresh ram_file and disk
  roots);
- the peer, llama-cpp-python's own server from the same build, twice:
  ``python -m llama_cpp.server --model PATH --n_threads 2 --n_ctx 4096 --n_batch
  512 --chat_format gemma`` with ``--cache true`` (RAM cache) and with the cache
  off. It is run with ``--interrupt_requests false``: its default cancels a
  running stream as soon as another request arrives, which would cut every
  concurrent stream short. Its RAM cache's quota (``--cache_size``) counts only
  llama.cpp's state, not the copy of the logits buffer each entry also holds
  (n_batch x vocabulary floats: 537 MB for gemma-3), so it is set to keep a few
  entries (about one per conversation) rather than the default 2 GB, which would
  hold many GB of logits on this shared machine.

One client (httpx, async, streaming) drives all of them, alternating which server
goes first from one measurement to the next. Every prompt is the same on every
server; each measurement uses prompts of its own, so no server is helped by an
earlier one.

1. ``multi_turn``: several conversations, each with a document of its own in its
   first message (``--shared-context``: one for all), resend their whole history
   every turn (streamed chat, greedy,
   a few new tokens per turn), replayed by 1 client (interleaved: turn 1 of every
   conversation, then turn 2, ...) and by 4 concurrent clients (one conversation
   each), one turn (of every conversation) on each server in turn. Reported: time
   to first token p50/p95 on turns 2 and later. Goal: ours at most 1/5 of the
   peer's.
2. ``streams``: 1, 2, 4 and 8 concurrent streamed completions of distinct cold
   prompts. Reported: aggregate generated tokens/s (tokens of all streams / the
   time from the first request to the last stream's end), p50/p99 time to first
   token, and whether every stream ended properly (``length`` with all its
   ``max_tokens``, or ``stop``). Goal: at 4 streams ours at least 2x the peer's
   tokens/s, no stream cut off.
3. ``overhead``: one warm (exact-hit) non-streamed chat request, repeated. Our
   server's ``server-timing`` header says how long it took from the request's
   arrival to the response's start (``app``) and how long of that the runtime's
   API took (``lib``); ``app - lib`` is the HTTP layer's cost. Goal: under 5 ms.
   The client's wall time is shown next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml

from bench.common import (
    N_BATCH,
    N_CTX,
    N_THREADS,
    REPO,
    command_line,
    header,
    median,
    model_path,
    percentile,
    result_options,
    table,
    text,
    tier_roots,
    write_result,
)

NAME = "http_serving"
MODEL = "gemma-3-270m"
PEER_CACHE_BYTES = 96 << 20  # llama.cpp state only: about 5-8 entries (plus 537 MB of logits each)
FIRST = [
    "Which places does this text mention most often?",
    "Summarise the text in one sentence.",
    "Who are the people in this text?",
    "What happens near the old mill?",
    "List the buildings named in the text.",
    "What season is it in the text?",
    "Which journeys does the text describe?",
    "Name three things that were built.",
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


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    """One HTTP server process this benchmark started."""

    label: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    ours: bool

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(server: Server, path: str, timeout_s: float = 600.0) -> None:
    """Poll `path` until it answers 200 (loading a model takes a while on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{server.label} exited ({server.process.returncode}):\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + path, timeout=5.0).status_code == 200:
                return
        time.sleep(0.5)
    server.stop()
    raise SystemExit(f"{server.label} did not answer {path} within {timeout_s:.0f} s")


def our_config(tmp: Path, roots: Any) -> Path:
    """sys.yaml with fresh tier roots, 2 threads, logs under `tmp`."""
    config = yaml.safe_load((REPO / "sys.yaml").read_text(encoding="utf-8"))
    for tier in config["cache"]["tiers"]:
        if tier["kind"] == "ram_file":
            tier["root"] = str(roots.ram_file)
        elif tier["kind"] == "disk":
            tier["root"] = str(roots.disk)
    model = next(m for m in config["models"] if m["name"] == MODEL)
    model["n_threads"] = N_THREADS
    model.setdefault("n_ctx", N_CTX)
    model.setdefault("n_batch", N_BATCH)
    config["models"] = [model]
    config.setdefault("daemon", {})["log_file"] = str(tmp / "erllama-py.log")
    path = tmp / "sys.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_ours(tmp: Path, roots: Any) -> Server:
    port = free_port()
    log = tmp / "ours.log"
    command = [sys.executable, "-m", "erllama_py.cli", "serve",
               "--config", str(our_config(tmp, roots)), "--port", str(port)]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    server = Server("erllama-py", f"http://127.0.0.1:{port}", process, log, ours=True)
    wait_until_up(server, "/health/ready")
    return server


def start_peer(tmp: Path, *, cache: bool) -> Server:
    port = free_port()
    label = "llama_cpp.server" + (" --cache" if cache else "")
    log = tmp / f"peer-{'cache' if cache else 'nocache'}.log"
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path()),
        "--model_alias", MODEL, "--n_threads", str(N_THREADS),
        "--n_threads_batch", str(N_THREADS), "--n_ctx", str(N_CTX),
        "--n_batch", str(N_BATCH), "--n_ubatch", str(N_BATCH), "--chat_format", "gemma",
        "--interrupt_requests", "false", "--verbose", "false",
        # Its default (true) keeps n_ctx x n_vocab logits (4.3 GB here) and copies them
        # into every cache entry; off, an entry holds n_batch x n_vocab (its best case).
        "--logits_all", "false",
        "--host", "127.0.0.1", "--port", str(port),
        "--cache", "true" if cache else "false",
    ]  # fmt: skip
    if cache:
        command += ["--cache_type", "ram", "--cache_size", str(PEER_CACHE_BYTES)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    server = Server(label, f"http://127.0.0.1:{port}", process, log, ours=False)
    wait_until_up(server, "/v1/models")
    return server


@contextlib.contextmanager
def servers(peers: Sequence[str]) -> Iterator[list[Server]]:
    """Ours and the asked peers, up at once (idle ones cost memory, not CPU)."""
    started: list[Server] = []
    with (
        tempfile.TemporaryDirectory(prefix="erllama-bench-http-") as tmp,
        tier_roots(NAME) as roots,
    ):
        try:
            started.append(start_ours(Path(tmp), roots))
            for peer in peers:
                started.append(start_peer(Path(tmp), cache=peer == "cache"))
            yield started
        finally:
            for server in started:
                server.stop()


# ---------------------------------------------------------------- the client


@dataclass
class StreamRun:
    """One streamed request: times (ms, from sending it), what came back, how it ended."""

    ttft_ms: float
    total_ms: float
    text: str
    tokens: int  # usage.completion_tokens when the server sends it, else content chunks
    finish: str | None
    cached: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None


async def stream(
    client: httpx.AsyncClient, server: Server, path: str, body: dict[str, Any]
) -> StreamRun:
    """POST a streamed request and read its server-sent events."""
    body = {"model": MODEL, "temperature": 0.0, "stream": True, **body}
    if server.ours:
        body["stream_options"] = {"include_usage": True}
    chat = path.endswith("/chat/completions")
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    chunks = 0
    finish: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    async with client.stream("POST", server.url + path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            error = f"HTTP {response.status_code}: {response.text[:200]}"
        else:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    error = str(event["error"])
                    continue
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") if chat else choice["text"]
                    if piece:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(piece)
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    details = (usage or {}).get("prompt_tokens_details") or {}
    return StreamRun(
        ttft_ms=((first or end) - started) * 1000.0,
        total_ms=(end - started) * 1000.0,
        text="".join(parts),
        tokens=int(usage["completion_tokens"]) if usage else chunks,
        finish=finish,
        cached=details.get("cached_tokens") if usage else None,
        prompt_tokens=usage.get("prompt_tokens") if usage else None,
        error=error,
    )


def new_client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits)


def rotated(items: Sequence[Server], k: int) -> list[Server]:
    k %= len(items)
    return [*items[k:], *items[:k]]


# ---------------------------------------------------------------- 1. multi-turn replay


@dataclass
class TurnLog:
    ttft: dict[int, list[float]] = field(default_factory=dict)  # turn -> times
    cached_share: list[float] = field(default_factory=list)  # ours, turns 2+
    errors: list[str] = field(default_factory=list)

    def later(self) -> list[float]:
        return [t for turn, times in self.ttft.items() if turn > 0 for t in times]


def question(conversation: int, turn: int, context: str) -> str:
    if turn == 0:
        return f"{context}\n\nQuestion: {FIRST[conversation % len(FIRST)]}"
    return FOLLOW_UPS[(conversation + turn) % len(FOLLOW_UPS)]


async def replay(
    all_servers: Sequence[Server], *, clients: int, conversations: int, turns: int,
    words: int, max_tokens: int, tag: str, shared_context: bool,
) -> dict[str, TurnLog]:  # fmt: skip
    """`conversations` conversations of `turns` turns on every server, split among `clients`
    concurrent clients (each interleaves its conversations). Turn by turn: one turn of every
    conversation on one server, then on the next (the order rotating), so that the shared
    machine's load falls on all servers alike."""
    if shared_context:
        contexts = [text(f"http-context-{tag}", words)] * conversations
    else:
        contexts = [text(f"http-context-{tag}-{c}", words) for c in range(conversations)]
    logs = {s.label: TurnLog() for s in all_servers}
    histories = {s.label: {c: [] for c in range(conversations)} for s in all_servers}
    groups = [[c for c in range(conversations) if c % clients == k] for k in range(clients)]

    async def client_turn(
        client: httpx.AsyncClient, server: Server, turn: int, mine: list[int]
    ) -> None:
        log = logs[server.label]
        for c in mine:
            messages: list[dict[str, str]] = histories[server.label][c]
            messages.append({"role": "user", "content": question(c, turn, contexts[c])})
            run = await stream(
                client, server, "/v1/chat/completions",
                {"messages": messages, "max_tokens": max_tokens},
            )  # fmt: skip
            if run.error:
                log.errors.append(run.error)
            messages.append({"role": "assistant", "content": run.text})
            log.ttft.setdefault(turn, []).append(run.ttft_ms)
            if turn > 0 and run.cached is not None and run.prompt_tokens:
                log.cached_share.append(run.cached / run.prompt_tokens)

    async with new_client() as client:
        for turn in range(turns):
            for server in rotated(all_servers, turn):
                await asyncio.gather(*(client_turn(client, server, turn, g) for g in groups if g))
    return logs


def multi_turn_part(all_servers: list[Server], args: argparse.Namespace) -> str:
    rows: list[list[object]] = []
    ratio_rows: list[list[object]] = []
    notes: list[str] = []
    for clients in args.clients:
        conversations = max(args.conversations, clients)
        print(f"multi_turn: {clients} client(s)", flush=True)
        logs = asyncio.run(
            replay(
                all_servers, clients=clients, conversations=conversations, turns=args.turns,
                words=args.words, max_tokens=args.turn_tokens, tag=f"{clients}",
                shared_context=args.shared_context,
            )
        )  # fmt: skip
        ours = logs[all_servers[0].label]
        for server in all_servers:
            log = logs[server.label]
            later = log.later()
            share = (
                f"{100 * median(log.cached_share):.0f}%"
                if server.ours and log.cached_share
                else "-"
            )
            rows.append([
                clients, server.label, f"{median(log.ttft.get(0, [])):.0f}",
                f"{percentile(later, 0.5):.0f}", f"{percentile(later, 0.95):.0f}", share,
                len(later), len(log.errors),
            ])  # fmt: skip
            notes += [f"{server.label}, {clients} client(s): {e}" for e in log.errors[:3]]
        for server in all_servers[1:]:
            theirs = logs[server.label]
            peer = theirs.later()
            per_turn = [median(ours.ttft[t]) / median(theirs.ttft[t]) for t in ours.ttft if t > 0]
            ratio_rows.append([
                clients, server.label,
                f"{percentile(ours.later(), 0.5) / percentile(peer, 0.5):.3f}",
                f"{percentile(ours.later(), 0.95) / percentile(peer, 0.95):.3f}",
                f"{median(per_turn):.3f} ({min(per_turn):.3f}-{max(per_turn):.3f})",
            ])  # fmt: skip
    out = [
        "## 1. Multi-turn chat replay (streamed, full history resent every turn)",
        "",
        f"{args.conversations} conversations (at least one per client) of {args.turns} turns; "
        f"a ~{args.words}-word document in the first message "
        + ("shared by every conversation" if args.shared_context else "of each conversation")
        + f", a short question per turn, {args.turn_tokens} new tokens per turn, greedy. "
        "Times in ms from sending the request to the first content chunk. *from cache*: "
        "ours, median of "
        "`cached_tokens / prompt_tokens` on turns 2+.",
        "",
        table(
            [
                "clients",
                "server",
                "turn 1 p50",
                "turns 2+ p50",
                "turns 2+ p95",
                "from cache",
                "turns 2+",
                "errors",
            ],
            rows,
        ),
        "",
        "Ours / peer, time to first token on turns 2+ (goal <= 0.2); *per turn*: the "
        "median over turns 2+ of the ratio of that turn's medians (each turn ran on every "
        "server within seconds, so it is the figure least moved by the machine's load):",
        "",
        table(
            ["clients", "peer", "p50 ours/peer", "p95 ours/peer", "per turn (min-max)"],
            ratio_rows,
        ),
    ]
    if notes:
        out += ["", "Errors:", "", *[f"- {n}" for n in notes]]
    return "\n".join(out)


# ---------------------------------------------------------------- 2. concurrent streams


@dataclass
class StreamsRep:
    tokens_per_s: float
    ttfts: list[float]
    complete: int
    total: int
    problems: list[str]


def ended_properly(run: StreamRun, max_tokens: int) -> bool:
    if run.error:
        return False
    if run.finish == "stop":
        return True
    return run.finish == "length" and run.tokens >= max_tokens


async def streams_rep(
    server: Server, n: int, *, words: int, max_tokens: int, tag: str
) -> StreamsRep:
    prompts = [f"Continue this story.\n\n{text(f'http-stream-{tag}-{i}', words)}" for i in range(n)]
    async with new_client() as client:
        started = time.perf_counter()
        runs = await asyncio.gather(
            *(
                stream(client, server, "/v1/completions", {"prompt": p, "max_tokens": max_tokens})
                for p in prompts
            )
        )
        wall = time.perf_counter() - started
    tokens = sum(r.tokens for r in runs)
    ok = [ended_properly(r, max_tokens) for r in runs]
    problems = [
        f"finish={r.finish} tokens={r.tokens} error={r.error}"
        for r, good in zip(runs, ok, strict=True)
        if not good
    ]
    return StreamsRep(tokens / wall, [r.ttft_ms for r in runs], sum(ok), n, problems)


def streams_part(all_servers: list[Server], args: argparse.Namespace) -> str:
    reps: dict[tuple[str, int], list[StreamsRep]] = {}
    step = 0
    for rep in range(args.reps):
        for n in args.streams:
            for server in rotated(all_servers, step):
                print(f"streams: {server.label}, {n} stream(s), rep {rep + 1}", flush=True)
                reps.setdefault((server.label, n), []).append(
                    asyncio.run(
                        streams_rep(
                            server, n, words=args.prompt_words, max_tokens=args.stream_tokens,
                            tag=f"{n}-{rep}",
                        )
                    )
                )  # fmt: skip
            step += 1
    rows: list[list[object]] = []
    ratio_rows: list[list[object]] = []
    problems: list[str] = []
    ours = all_servers[0].label
    for n in args.streams:
        for server in all_servers:
            got = reps[(server.label, n)]
            rates = [r.tokens_per_s for r in got]
            ttfts = [t for r in got for t in r.ttfts]
            complete = sum(r.complete for r in got)
            total = sum(r.total for r in got)
            rows.append([
                n, server.label, f"{median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})",
                f"{percentile(ttfts, 0.5):.0f}", f"{percentile(ttfts, 0.99):.0f}",
                f"{complete}/{total}",
            ])  # fmt: skip
            problems += [f"{server.label}, {n} streams: {p}" for r in got for p in r.problems[:3]]
        for server in all_servers[1:]:
            ratios = [
                a.tokens_per_s / b.tokens_per_s
                for a, b in zip(reps[(ours, n)], reps[(server.label, n)], strict=True)
            ]
            ratio_rows.append([
                n, server.label, f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            ])  # fmt: skip
    out = [
        "## 2. Concurrent streams: aggregate tokens/s and time to first token",
        "",
        f"Streamed completions of distinct cold prompts (~{args.prompt_words} words), "
        f"{args.stream_tokens} tokens each, greedy, {args.reps} repetition(s) per level. "
        "Rate: tokens of all streams / time from the first request to the last stream's end "
        "(median and min-max over repetitions). *ended properly*: `length` with all its "
        "tokens, or `stop` (the peer sends no usage in streams: its tokens are counted as "
        "content chunks, one per token). Our model serves 4 sequences at once (sys.yaml's "
        "`n_seq_max`): at 8 streams, 4 wait.",
        "",
        table(
            ["streams", "server", "tokens/s", "ttft p50 ms", "ttft p99 ms", "ended properly"],
            rows,
        ),
        "",
        "Ours / peer, aggregate tokens/s, median of the per-repetition ratios (goal at 4 "
        "streams >= 2):",
        "",
        table(["streams", "peer", "ours/peer"], ratio_rows),
    ]
    if problems:
        out += ["", "Streams that did not end properly:", "", *[f"- {p}" for p in problems]]
    return "\n".join(out)


# ---------------------------------------------------------------- 3. HTTP overhead


def server_timing(value: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in value.split(","):
        name, _, dur = part.strip().partition(";dur=")
        with contextlib.suppress(ValueError):
            out[name] = float(dur)
    return out


def overhead_part(server: Server, args: argparse.Namespace) -> str:
    messages = [{"role": "user", "content": text("http-overhead", 120) + "\n\nSummarise."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": args.overhead_tokens,
            "temperature": 0.0}  # fmt: skip
    app: list[float] = []
    lib: list[float] = []
    wall: list[float] = []
    cached: list[int] = []
    with httpx.Client(timeout=600.0) as client:
        for i in range(args.overhead_reps + 1):
            started = time.perf_counter()
            response = client.post(server.url + "/v1/chat/completions", json=body)
            elapsed = (time.perf_counter() - started) * 1000.0
            response.raise_for_status()
            if i == 0:  # the cold request that saves the prompt
                continue
            timing = server_timing(response.headers.get("server-timing", ""))
            app.append(timing["app"])
            lib.append(timing["lib"])
            wall.append(elapsed)
            usage = response.json()["usage"]
            cached.append(int(usage["prompt_tokens_details"]["cached_tokens"]))
    over = [a - b for a, b in zip(app, lib, strict=True)]
    client_over = [w - b for w, b in zip(wall, lib, strict=True)]
    rows = [
        ["server: app - lib (HTTP layer)", f"{median(over):.2f}", f"{percentile(over, 0.9):.2f}",
         f"{min(over):.2f}"],
        ["server: lib (runtime API call)", f"{median(lib):.2f}", f"{percentile(lib, 0.9):.2f}",
         f"{min(lib):.2f}"],
        ["client wall - lib (with the client and loopback)", f"{median(client_over):.2f}",
         f"{percentile(client_over, 0.9):.2f}", f"{min(client_over):.2f}"],
        ["client wall", f"{median(wall):.2f}", f"{percentile(wall, 0.9):.2f}", f"{min(wall):.2f}"],
    ]  # fmt: skip
    return "\n".join([
        "## 3. HTTP overhead on a warm request (ours)",
        "",
        f"One non-streamed chat request (~{len(messages[0]['content'].split())} words, "
        f"{args.overhead_tokens} new token(s), greedy) sent {args.overhead_reps} times after "
        "a first one that saved it, one connection kept alive. `app` and `lib` come from the "
        "response's `server-timing` header: the request's arrival to the response's start, "
        "and the runtime API call inside it. Prompt tokens from the cache: "
        f"{median(cached):.0f} of each request (median). Goal: app - lib < 5 ms.",
        "",
        table(["ms", "median", "p90", "min"], rows),
    ])  # fmt: skip


# ---------------------------------------------------------------- main


def ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


QUICK = {
    "conversations": 4, "turns": 3, "words": 400, "turn_tokens": 12, "clients": [1, 4],
    "streams": [1, 2, 4, 8], "stream_tokens": 48, "prompt_words": 60, "reps": 1,
    "overhead_reps": 15,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small parameters: a smoke run")
    parser.add_argument("--parts", default="multi_turn,streams,overhead")
    parser.add_argument("--peers", default="cache,nocache", help="llama_cpp.server cache on/off")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--words", type=int, default=700, help="each conversation's document")
    parser.add_argument(
        "--shared-context",
        action="store_true",
        help="one document for every conversation (the peer then reuses its live context)",
    )
    parser.add_argument("--turn-tokens", type=int, default=16)
    parser.add_argument("--clients", type=ints, default=[1, 4])
    parser.add_argument("--streams", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--overhead-reps", type=int, default=50)
    parser.add_argument("--overhead-tokens", type=int, default=1)
    result_options(parser)
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    parts = [p for p in args.parts.split(",") if p]
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(parts) - {"multi_turn", "streams", "overhead"}
    if unknown or set(peers) - {"cache", "nocache"}:
        parser.error(f"unknown parts or peers: {sorted(unknown)} {peers}")
    head = header("HTTP serving: erllama-py serve vs llama_cpp.server", command_line(NAME),
                  dirty_ok=args.dirty)  # fmt: skip
    sections = [head]
    with servers(peers) as up:
        sections.append(
            "Servers: " + "; ".join(f"{s.label} (pid {s.process.pid})" for s in up)
            + f". Peer RAM cache quota {PEER_CACHE_BYTES >> 20} MB of llama.cpp state; "
            f"peer run with --interrupt_requests false. Load average now "
            f"{os.getloadavg()[0]:.2f}."
        )  # fmt: skip
        runs = {"overhead": lambda: overhead_part(up[0], args),
                "multi_turn": lambda: multi_turn_part(up, args),
                "streams": lambda: streams_part(up, args)}  # fmt: skip
        for part in ("overhead", "multi_turn", "streams"):
            if part in parts:
                sections.append(runs[part]())
                print(sections[-1] + "\n", flush=True)  # a long run's parts survive its end
    write_result(NAME, "\n\n".join(sections), args.output, dirty_ok=args.dirty)


if __name__ == "__main__":
    main()
