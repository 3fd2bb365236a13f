"""What a GGUF file is: its checks, its fingerprint, and the description of a loaded model.

The fingerprint identifies a file cheaply but soundly (see `BackendInfo`); the
description (`describe_model`) is what a context worker reports when its
model has loaded. Only llama-cpp-python's low-level ctypes module is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import llama_cpp as _L

from erllama_py.errors import ModelLoadError
from erllama_py.model import llama_log
from erllama_py.model.backend import BackendInfo

__all__ = [
    "CHAT_FALLBACKS",
    "FINGERPRINT_EDGE",
    "check_model_file",
    "describe_model",
    "fingerprint_gguf",
    "model_meta",
    "quant_name",
]

FINGERPRINT_EDGE = 1 << 20
"""Bytes hashed from each end of the file by the default fingerprint."""

CHAT_FALLBACKS: Mapping[str, str] = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "phi3": "phi3",
    "llama": "llama3",
}
"""Built-in llama.cpp chat template used, by architecture, when a GGUF has none."""

_FTYPES = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1",
    10: "q2_k", 11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m",
    16: "q5_k_s", 17: "q5_k_m", 18: "q6_k", 19: "iq2_xxs", 20: "iq2_xs", 21: "q2_k_s",
    22: "iq3_xs", 23: "iq3_xxs", 24: "iq1_s", 25: "iq4_nl", 26: "iq3_s", 27: "iq3_m",
    28: "iq2_s", 29: "iq2_m", 30: "iq4_xs", 31: "iq1_m", 32: "bf16", 36: "tq1_0",
    37: "tq2_0", 38: "mxfp4_moe", 39: "nvfp4", 40: "q1_0", 41: "q2_0",
}  # fmt: skip


def quant_name(file_type: int | None) -> str:
    """``general.file_type`` as a short lower-case name (``15`` -> ``"q4_k_m"``)."""
    if file_type is None:
        return "unknown"
    return _FTYPES.get(file_type, f"ftype{file_type}")


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _gguf_data_offset(path: Path) -> int:
    """Where the tensor data of a (valid) GGUF starts, via ggml's C GGUF parser.

    The ``gguf`` package's reader takes about 11 s on gemma-3's 262k-token
    vocabulary; the C parser takes about 25 ms.
    """
    lib = llama_log.ggml_base_library()
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_get_data_offset.restype = ctypes.c_size_t
    lib.gguf_get_data_offset.argtypes = [ctypes.c_void_p]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_free.restype = None
    h = lib.gguf_init_from_file(os.fsencode(path), _GgufInitParams(True, None))
    if not h:
        raise ModelLoadError(f"{path}: cannot parse the GGUF header")
    try:
        return int(lib.gguf_get_data_offset(h))
    finally:
        lib.gguf_free(h)


def fingerprint_gguf(path: str | Path, full: bool = False) -> bytes:
    """The 32-byte identity of a GGUF file (see :class:`BackendInfo` for the definition).

    Raises ``OSError`` if the file cannot be read and :class:`ModelLoadError`
    if its header cannot be parsed.
    """
    p = Path(path)
    h = hashlib.sha256()
    if full:
        h.update(b"erllama-gguf-full-v1")
        with p.open("rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return h.digest()
    size = p.stat().st_size
    offset = _gguf_data_offset(p)
    h.update(b"erllama-gguf-fp-v1")
    h.update(size.to_bytes(8, "little"))
    with p.open("rb") as f:
        h.update(f.read(offset))
        f.seek(0)
        h.update(f.read(FINGERPRINT_EDGE))
        f.seek(max(0, size - FINGERPRINT_EDGE))
        h.update(f.read(FINGERPRINT_EDGE))
    return h.digest()


def check_model_file(path: Path) -> int:
    """The size of a readable, non-empty GGUF file; `ModelLoadError` otherwise."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"model file not found: {path}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot access model file {path}: {e.strerror}") from e
    if not path.is_file():
        raise ModelLoadError(f"model path is not a regular file: {path}")
    if st.st_size == 0:
        raise ModelLoadError(f"model file is empty: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e.strerror}") from e
    if magic != b"GGUF":
        raise ModelLoadError(f"not a GGUF file (magic {magic!r}): {path}")
    return st.st_size


def model_meta(model: Any, key: str) -> str | None:
    """A metadata value of a loaded model as text, or None."""
    buf = ctypes.create_string_buffer(256)
    n = int(_L.llama_model_meta_val_str(model, key.encode(), buf, 256))
    if n < 0:
        return None
    if n >= 256:
        buf = ctypes.create_string_buffer(n + 1)
        _L.llama_model_meta_val_str(model, key.encode(), buf, n + 1)
    return buf.value.decode("utf-8", errors="replace")


def describe_model(
    model: Any,
    path: Path,
    file_size: int,
    *,
    n_ctx: int,
    n_batch: int,
    n_ubatch: int,
    n_seq_max: int,
    kv_size: int,
    ctx_params: dict[str, Any],
    fallback: str | None,
    full_fingerprint: bool,
) -> BackendInfo:
    """The description a worker reports for a loaded model and its context."""
    vocab = _L.llama_model_get_vocab(model)
    n_vocab = int(_L.llama_vocab_n_tokens(vocab))
    bos = int(_L.llama_vocab_bos(vocab))
    eos = int(_L.llama_vocab_eos(vocab))
    eog = tuple(t for t in range(n_vocab) if _L.llama_vocab_is_eog(vocab, t))
    arch = model_meta(model, "general.architecture") or "unknown"
    ftype = model_meta(model, "general.file_type")
    desc = ctypes.create_string_buffer(256)
    _L.llama_model_desc(model, desc, 256)
    tmpl_raw = _L.llama_model_chat_template(model, None)
    tmpl = tmpl_raw.decode("utf-8", errors="replace") if tmpl_raw else None
    # Whether the tokenizer puts a space before the text: "a" comes back as " a".
    probe = (_L.llama_token * 8)()
    n = int(_L.llama_tokenize(vocab, b"a", 1, probe, 8, False, False))
    piece = ctypes.create_string_buffer(16)
    m = int(_L.llama_token_to_piece(vocab, probe[0], piece, 16, 0, False)) if n > 0 else 0
    add_space_prefix = piece.raw[: max(m, 0)].startswith(b" ")
    return BackendInfo(
        backend="llama",
        name=model_meta(model, "general.name") or path.stem,
        description=desc.value.decode("utf-8", errors="replace"),
        architecture=arch,
        quant=quant_name(int(ftype) if ftype and ftype.isdigit() else None),
        file_size=file_size,
        fingerprint=fingerprint_gguf(path, full=full_fingerprint),
        n_vocab=n_vocab,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        n_seq_max=n_seq_max,
        kv_size=kv_size,
        n_swa=int(_L.llama_model_n_swa(model)),
        n_ctx_train=int(_L.llama_model_n_ctx_train(model)),
        n_embd=int(_L.llama_model_n_embd(model)),
        bos=bos if bos >= 0 else None,
        add_bos=bool(_L.llama_vocab_get_add_bos(vocab)),
        eos=eos if eos >= 0 else None,
        eog=eog,
        add_space_prefix=add_space_prefix,
        chat_template=tmpl,
        chat_template_fallback=fallback or CHAT_FALLBACKS.get(arch),
        ctx_params=ctx_params,
        path=str(path),
    )
