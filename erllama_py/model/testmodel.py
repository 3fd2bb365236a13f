"""A tiny random-weight llama GGUF for tests, and corrupt GGUF files.

:func:`write_test_model` writes a llama-architecture model with f32 random
weights (2 layers, n_embd 64, about 0.6 MB) and an SPM vocabulary:

=======  ==========================================  ==========
ids      pieces                                      token type
=======  ==========================================  ==========
0        ``<unk>``                                   2 (unknown)
1        ``<s>`` (BOS, added by tokenize)            3 (control)
2        ``</s>`` (EOS, end of generation)           3 (control)
3, 4     ``<|im_start|>``, ``<|im_end|>`` (EOG)      3 (control)
5..260   the byte tokens ``<0x00>``..``<0xFF>``      6 (byte)
261..    ``▁``, ``a``..``z`` and every prefix of
         each ``▁word`` of ``vocab_words``           1 (normal)
last     each of ``control_tokens`` (none by          3 (control)
         default), e.g. ``<|python_tag|>``
=======  ==========================================  ==========

The model's ``tokenizer.chat_template`` is a chatml Jinja template (or any
template given, ``--chat-template FILE`` on the command line), rendered by
`erllama_py.model.jinja_chat`.
Its output is gibberish, but prefill, decode, per-sequence state save and
restore and greedy determinism are all real llama.cpp computations.

Every token string is unique: llama.cpp aborts the whole process
(``GGML_ASSERT(id_to_token.size() == token_to_id.size())``) on a duplicate,
which :func:`write_duplicate_token_model` reproduces on purpose for fault
tests (load it only in a subprocess).

Command line: ``python -m erllama_py.model.testmodel PATH [--seed N]``
(:func:`main_make_test_model`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_WORDS",
    "main_make_test_model",
    "tiny_vocab",
    "write_corrupt_models",
    "write_duplicate_token_model",
    "write_test_model",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_WORDS: tuple[str, ...] = (
    "the", "a", "of", "and", "to", "in", "is", "it", "that", "was",
    "hello", "world", "cache", "model", "token", "state", "yes", "no",
    "one", "two", "three", "red", "green", "blue", "cat", "dog", "tree",
    "sky", "sun", "moon", "fast", "slow", "warm", "cold", "answer", "question",
)  # fmt: skip

_TYPE_NORMAL = 1
_TYPE_UNKNOWN = 2
_TYPE_CONTROL = 3
_TYPE_BYTE = 6
_SPACE = "\u2581"  # SentencePiece's word-boundary marker


def tiny_vocab(
    vocab_words: Sequence[str] = DEFAULT_WORDS,
) -> tuple[list[str], list[float], list[int]]:
    """Return the (pieces, scores, token types) of the test vocabulary, unique pieces."""
    pieces: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types: list[int] = [_TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_CONTROL, _TYPE_CONTROL, _TYPE_CONTROL]
    scores: list[float] = [0.0] * len(pieces)
    for b in range(256):
        pieces.append(f"<0x{b:02X}>")
        types.append(_TYPE_BYTE)
        scores.append(0.0)
    seen = set(pieces)
    # SPM merges two adjacent pieces only when their concatenation is itself a
    # piece, so a whole word needs every prefix in the vocabulary. Longer
    # pieces get higher scores so that merges prefer them.
    normal = [_SPACE, *"abcdefghijklmnopqrstuvwxyz"]
    for word in vocab_words:
        w = _SPACE + word
        normal.extend(w[:i] for i in range(2, len(w) + 1))
    for piece in normal:
        if piece in seen:
            continue
        seen.add(piece)
        pieces.append(piece)
        types.append(_TYPE_NORMAL)
        scores.append(float(len(piece)) - 1.0 / (1 + len(pieces)))
    return pieces, scores, types


def write_test_model(
    path: str | Path,
    seed: int = 0,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    vocab_words: Sequence[str] = DEFAULT_WORDS,
    chat_template: str | None = CHATML_TEMPLATE,
    control_tokens: Sequence[str] = (),
    weight_scale: float = 0.25,
    _duplicate_token: bool = False,
) -> Path:
    """Write a tiny random-weight llama GGUF to ``path`` and return the path.

    Deterministic for a given ``seed`` and arguments. Raises ``ValueError``
    for inconsistent shapes (``n_embd`` not divisible by ``n_head``, ...).
    """
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    path = Path(path)
    head_dim = n_embd // n_head
    pieces, scores, types = tiny_vocab(vocab_words)
    for extra in control_tokens:
        if extra in pieces:
            raise ValueError(f"control token {extra!r} is already in the vocabulary")
        pieces.append(extra)
        scores.append(0.0)
        types.append(_TYPE_CONTROL)
    if _duplicate_token:
        pieces[-1] = pieces[-2]
    n_vocab = len(pieces)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        scale = weight_scale / np.sqrt(shape[-1])
        out: np.ndarray = (rng.standard_normal(shape) * scale).astype(np.float32)
        return out

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"erllama-py tiny test model (seed {seed})")
    w.add_description("random weights, for tests only")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    # numpy shapes are (rows, cols); GGUF stores ne reversed, as llama.cpp expects.
    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd) * 4)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", rand(n_vocab, n_embd) * 4)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", rand(n_head * head_dim, n_embd))
        w.add_tensor(p + "attn_k.weight", rand(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", rand(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", rand(n_embd, n_head * head_dim))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", rand(n_embd, n_ff))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_duplicate_token_model(path: str | Path, seed: int = 0) -> Path:
    """Write a test model whose vocabulary repeats a piece.

    Loading it makes llama.cpp ABORT the process (a ``GGML_ASSERT`` in the
    vocabulary loader): use it only in a subprocess, to test that a worker's
    death is survivable.
    """
    return write_test_model(path, seed=seed, _duplicate_token=True)


def write_corrupt_models(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write corrupt model files into ``directory`` and return them by kind.

    Kinds: ``missing`` (a path that does not exist), ``empty`` (0 bytes),
    ``not_gguf`` (text), ``wrong_magic`` (a valid model with its magic
    replaced), ``header_only`` (the 24-byte GGUF header and nothing else),
    ``truncated`` (a valid model cut in half, inside its tensor data) and
    ``truncated_metadata`` (cut inside the metadata). llama.cpp refuses each
    of these without aborting; see :func:`write_duplicate_token_model` for a
    file that aborts.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    good = write_test_model(d / "good-for-corruption.gguf", seed=seed)
    data = good.read_bytes()
    good.unlink()
    out: dict[str, Path] = {"missing": d / "does-not-exist.gguf"}

    def put(kind: str, blob: bytes) -> None:
        p = d / f"{kind}.gguf"
        p.write_bytes(blob)
        out[kind] = p

    put("empty", b"")
    put("not_gguf", b"this is not a model file\n" * 40)
    put("wrong_magic", b"GGUX" + data[4:])
    put("header_only", data[:24])
    put("truncated", data[: len(data) // 2])
    put("truncated_metadata", data[:4096])
    return out


def main_make_test_model(argv: Sequence[str] | None = None) -> int:
    """CLI entry: write the tiny test model to PATH; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="erllama-py make-test-model",
        description="Write a tiny random-weight llama GGUF for tests.",
    )
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-ctx-train", type=int, default=4096)
    parser.add_argument(
        "--chat-template",
        type=Path,
        metavar="FILE",
        help="write this Jinja file as tokenizer.chat_template (default: chatml)",
    )
    parser.add_argument("--no-chat-template", action="store_true", help="write no template")
    args = parser.parse_args(argv)
    template: str | None = CHATML_TEMPLATE
    if args.chat_template is not None:
        template = args.chat_template.read_text(encoding="utf-8")
    if args.no_chat_template:
        template = None
    p = write_test_model(
        args.path,
        seed=args.seed,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_ctx_train=args.n_ctx_train,
        chat_template=template,
    )
    print(f"{p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main_make_test_model())
