"""Warm restore against its floor: our exact hit vs raw llama.cpp restoring the same state.

Run from the repository root::

    .venv/bin/python -m bench.warm_floor [--sizes 512,2000,3500] [--reps 15]

The floor, measured in this process in the same run: a plain llama.cpp
context (llama-cpp-python's low-level API, configured like our worker's:
same n_ctx, n_batch, n_seq_max, one KV stream per sequence, flash attention
as ours, 2 threads) prefills the prompt once, keeps the state
(``llama_state_seq_get_data``) and the last position's logits in memory, and
then, per repetition, clears the sequence, restores it with
``llama_state_seq_set_data`` and samples from the stored logits (argmax):
the least a warm start can cost. Next to it, alternating, ours: a 1-token
``rt.complete`` that is an exact hit on the RAM tier (``ttft_ms``, its
``restore_ms`` and the wall time of the call). Also measured apart, on the
same payload: its xxh3-64 checksum and a plain copy (what a restore would
cost if it copied). Goals: ours ttft / floor <= 1.5; wall / ttft <= 1.25.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from typing import Any

import llama_cpp as _L
import numpy as np
import xxhash

import erllama_py
from bench.common import (
    N_BATCH,
    N_CTX,
    N_THREADS,
    _model_has_swa,
    command_line,
    fingerprint,
    header,
    load,
    median,
    model_path,
    quiet,
    result_options,
    runtime_config,
    spread,
    table,
    tier_roots,
    tokens_of,
    write_result,
)

NAME = "warm_floor"
N_SEQ_MAX = 4  # our models' default


class RawContext:
    """A llama.cpp context driven directly, configured like our worker's."""

    def __init__(self, n_seq_max: int = N_SEQ_MAX, n_ctx: int = N_CTX) -> None:
        _L.llama_backend_init()
        with quiet():
            self.model = _L.llama_model_load_from_file(
                os.fsencode(model_path()), _L.llama_model_default_params()
            )
        cp = _L.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq_max
        cp.n_batch = N_BATCH
        cp.n_ubatch = N_BATCH
        cp.n_seq_max = n_seq_max
        cp.n_threads = N_THREADS
        cp.n_threads_batch = N_THREADS
        cp.swa_full = False
        cp.kv_unified = False
        cp.flash_attn_type = 0 if _model_has_swa() else 1
        cp.no_perf = True
        self.ctx = _L.llama_init_from_model(self.model, cp)
        self.mem = _L.llama_get_memory(self.ctx)
        self.n_vocab = int(_L.llama_vocab_n_tokens(_L.llama_model_get_vocab(self.model)))

    def decode(self, items: list[tuple[int, list[int]]], start: list[int]) -> list[int]:
        """One llama_decode of each (seq, tokens) at positions from `start[seq]`; logits
        for the last token of each: their batch rows, in order."""
        rows: list[int] = []
        n = sum(len(t) for _, t in items)
        batch = _L.llama_batch_init(n, 0, 1)
        try:
            k = 0
            for seq, toks in items:
                for j, tok in enumerate(toks):
                    batch.token[k] = tok
                    batch.pos[k] = start[seq] + j
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = seq
                    batch.logits[k] = j == len(toks) - 1
                    k += 1
                rows.append(k - 1)
                start[seq] += len(toks)
            batch.n_tokens = n
            rc = _L.llama_decode(self.ctx, batch)
            assert rc == 0, rc
        finally:
            _L.llama_batch_free(batch)
        return rows

    def clear(self, seq: int) -> None:
        _L.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def argmax(self, row: int) -> int:
        ptr = _L.llama_get_logits_ith(self.ctx, row)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def prefill(self, tokens: list[int]) -> tuple[Any, np.ndarray]:
        """Decode `tokens` into sequence 0; its state bytes and last logits (copies)."""
        _L.llama_memory_seq_rm(self.mem, 0, -1, -1)
        start = [0]
        for i in range(0, len(tokens), N_BATCH):
            self.decode([(0, tokens[i : i + N_BATCH])], start)
        ptr = _L.llama_get_logits_ith(self.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        size = int(_L.llama_state_seq_get_size(self.ctx, 0))
        state = (ctypes.c_uint8 * size)()
        assert int(_L.llama_state_seq_get_data(self.ctx, state, size, 0)) == size
        return state, logits

    def restore(self, state: Any, logits: np.ndarray) -> tuple[float, float, int]:
        """Clear, set_data, sample: (set_data ms, set_data + sample ms, the token)."""
        _L.llama_memory_seq_rm(self.mem, 0, -1, -1)
        t0 = time.perf_counter()
        read = int(_L.llama_state_seq_set_data(self.ctx, state, len(state), 0))
        t1 = time.perf_counter()
        token = int(np.argmax(logits))
        t2 = time.perf_counter()
        assert read == len(state)
        return (t1 - t0) * 1000.0, (t2 - t0) * 1000.0, token

    def close(self) -> None:
        _L.llama_free(self.ctx)
        _L.llama_model_free(self.model)


def _checksum_and_copy_ms(state: Any, logits: np.ndarray) -> tuple[float, float]:
    payload = memoryview(bytes(state) + logits.tobytes())
    t0 = time.perf_counter()
    xxhash.xxh3_64_intdigest(payload)
    t1 = time.perf_counter()
    copy = bytearray(payload)
    t2 = time.perf_counter()
    del copy
    return (t1 - t0) * 1000.0, (t2 - t1) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,2000,3500")
    parser.add_argument("--reps", type=int, default=15)
    result_options(parser)
    args = parser.parse_args()
    top = header("Warm restore vs raw llama.cpp", command_line(NAME), dirty_ok=args.dirty)
    rows: list[list[object]] = []
    parts: list[list[object]] = []
    with (
        tier_roots(NAME) as roots,
        erllama_py.start(runtime_config(roots, tiers=["ram"])) as rt,
    ):
        model = load(rt, NAME, tier="ram", fingerprint=fingerprint(NAME))
        raw = RawContext()
        for size in (int(s) for s in args.sizes.split(",")):
            print(f"{size} tokens", flush=True)
            tokens = tokens_of(rt, model, size, (NAME, size))
            cold = rt.complete(model, tokens, max_tokens=1)
            rt.cache.wait_idle(60.0)
            state, logits = raw.prefill(tokens)
            floor, set_data, ttft, restore, wall, same = [], [], [], [], [], []
            checks, copies = [], []
            for rep in range(args.reps):
                started = time.perf_counter()
                warm = rt.complete(model, tokens, max_tokens=1)
                wall.append((time.perf_counter() - started) * 1000.0)
                assert warm.cache.kind == "exact"
                ttft.append(float(warm.timings.ttft_ms or 0.0))
                restore.append(warm.timings.restore_ms)
                s_ms, f_ms, token = raw.restore(state, logits)
                set_data.append(s_ms)
                floor.append(f_ms)
                same.append(token == warm.tokens[0] == cold.tokens[0])
                if rep < 5:
                    c, p = _checksum_and_copy_ms(state, logits)
                    checks.append(c)
                    copies.append(p)
            ratios = [t / f for t, f in zip(ttft, floor, strict=True)]
            walls = [w / t for w, t in zip(wall, ttft, strict=True)]
            rows.append(
                [
                    size,
                    f"{len(state) + 4 * raw.n_vocab:,}",
                    spread(floor),
                    spread(ttft),
                    f"{median(ratios):.2f}",
                    spread(wall),
                    f"{median(walls):.2f}",
                    "yes" if all(same) else "no",
                ]
            )
            parts.append(
                [
                    size,
                    f"{median(set_data):.2f}",
                    f"{median(restore):.2f}",
                    f"{median(ttft) - median(restore):.2f}",
                    f"{median(wall) - median(ttft):.2f}",
                    f"{median(checks):.2f}",
                    f"{median(copies):.2f}",
                ]
            )
        raw.close()
    body = [
        f"RAM tier, {args.reps} exact hits per size after one cold run, each followed by one "
        "raw restore of the same state; ms, median (min-max); ratios are medians of the "
        "per-repetition ratios.",
        "",
        table(
            [
                "tokens",
                "payload bytes",
                "floor: set_data + sample",
                "ours ttft",
                "ours / floor (goal <= 1.5)",
                "ours wall",
                "wall / ttft (goal <= 1.25)",
                "same token",
            ],
            rows,
        ),
        "",
        "Where the milliseconds go (medians, ms):",
        "",
        table(
            [
                "tokens",
                "raw set_data",
                "ours restore_ms (claim; one worker call: restore, checksum beside, first sample)",
                "ours ttft - restore (submission, admission, the token applied)",
                "ours wall - ttft (result back to the caller)",
                "xxh3-64 of the payload",
                "a plain copy of it",
            ],
            parts,
        ),
    ]
    write_result(NAME, top + "\n".join(body), args.output, dirty_ok=args.dirty)


if __name__ == "__main__":
    main()
