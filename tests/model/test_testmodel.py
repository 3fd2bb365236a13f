"""The tiny test GGUF: deterministic, small, unique pieces, and really runnable by llama.cpp."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from erllama_py.model.llama_log import ABORT_PREFIX
from erllama_py.model.testmodel import (
    DEFAULT_WORDS,
    main_make_test_model,
    tiny_vocab,
    write_corrupt_models,
    write_duplicate_token_model,
    write_test_model,
)


def test_vocabulary_pieces_are_unique_and_typed() -> None:
    pieces, scores, types = tiny_vocab()
    assert len(pieces) == len(set(pieces)) == len(scores) == len(types)
    assert pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert pieces[5] == "<0x00>"
    assert pieces[260] == "<0xFF>"
    assert all(t == 6 for t in types[5:261])
    assert "\u2581hello" in pieces


def test_writing_is_deterministic_small_and_fast(tmp_path: Path) -> None:
    t = time.perf_counter()
    a = write_test_model(tmp_path / "a.gguf", seed=3)
    elapsed = time.perf_counter() - t
    b = write_test_model(tmp_path / "b.gguf", seed=3)
    c = write_test_model(tmp_path / "c.gguf", seed=4)
    print(f"\ntiny model: {a.stat().st_size} bytes written in {elapsed * 1e3:.0f} ms")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert 200_000 < a.stat().st_size < 1_000_000


def test_cli_entry_writes_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_make_test_model([str(tmp_path / "m.gguf"), "--seed", "1"]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0
    assert "m.gguf" in capsys.readouterr().out


def test_inconsistent_shapes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_test_model(tmp_path / "x.gguf", n_embd=63)


_CHECK = r"""
import json, sys
import numpy as np
from erllama_py.model.llama_backend import LlamaBackend
from erllama_py.model.backend import Decode, Prefill
from erllama_py.params import SamplingParams

out = {}
b = LlamaBackend.load(sys.argv[1], n_ctx=512, n_batch=256, n_seq_max=2, n_threads=2)
out["n_vocab"] = b.info.n_vocab
out["eog"] = list(b.info.eog)
out["template"] = b.info.chat_template is not None
toks = b.tokenize("hello world the cat and the dog " * 4)
g = b.new_sampler(SamplingParams())
b.step([Prefill(0, toks)])
buf = b.pack(0)
run1 = [b.step([Decode(0, g)])[0].token for _ in range(12)]
out["restored"] = b.unpack(1, buf)
run2 = [b.step([Decode(1, g)])[0].token for _ in range(12)]
b.clear_seq(0)
b.step([Prefill(0, toks)])
run3 = [b.step([Decode(0, g)])[0].token for _ in range(12)]
out["restore_equal"] = run1 == run2
out["greedy_deterministic"] = run1 == run3
out["seq_len"] = b.seq_len(0)
out["distinct_tokens"] = len(set(run1))
b.close()
print(json.dumps(out))
"""


def test_llama_cpp_loads_and_runs_the_tiny_model_in_a_subprocess(
    tiny_model_path: Path, run_python: object
) -> None:
    proc = run_python(_CHECK, str(tiny_model_path))  # type: ignore[operator]
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_vocab"] == len(tiny_vocab(DEFAULT_WORDS)[0])
    assert out["eog"] == [2, 4]
    assert out["template"]
    assert out["restored"] == out["seq_len"] - 12
    assert out["restore_equal"]
    assert out["greedy_deterministic"]
    assert out["distinct_tokens"] > 1  # not a degenerate constant output


_LOAD_ALL = r"""
import json, sys
from erllama_py.errors import ModelLoadError
from erllama_py.model.llama_backend import LlamaBackend
res = {}
for kind, path in json.loads(sys.argv[1]).items():
    try:
        LlamaBackend.load(path, n_ctx=256, n_batch=64, n_seq_max=1, n_threads=1).close()
        res[kind] = "loaded"
    except ModelLoadError as e:
        res[kind] = "ModelLoadError: " + str(e)
print(json.dumps(res))
"""


def test_corrupt_or_missing_files_raise_model_load_error(
    tmp_path: Path, run_python: object
) -> None:
    files = {k: str(p) for k, p in write_corrupt_models(tmp_path).items()}
    (tmp_path / "a-dir.gguf").mkdir()
    files["directory"] = str(tmp_path / "a-dir.gguf")
    proc = run_python(_LOAD_ALL, json.dumps(files))  # type: ignore[operator]
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, outcome in res.items():
        print(f"{kind}: {outcome}")
        assert outcome.startswith("ModelLoadError"), kind
    assert "not found" in res["missing"]
    assert "empty" in res["empty"]
    assert "not a GGUF" in res["not_gguf"]
    assert "not within the file bounds" in res["truncated"]  # llama.cpp's own reason
    assert "key-value" in res["header_only"]


def test_duplicate_token_model_aborts_the_process_with_a_reported_reason(
    tmp_path: Path, run_python: object
) -> None:
    path = write_duplicate_token_model(tmp_path / "dup.gguf")
    code = (
        "import sys\nfrom erllama_py.model.llama_backend import LlamaBackend\n"
        "LlamaBackend.load(sys.argv[1], n_ctx=256, n_batch=64, n_seq_max=1, n_threads=1)\n"
    )
    proc = run_python(code, str(path))  # type: ignore[operator]
    assert proc.returncode == -signal.SIGABRT
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith(ABORT_PREFIX))
    assert "GGML_ASSERT(id_to_token.size() == token_to_id.size())" in line
