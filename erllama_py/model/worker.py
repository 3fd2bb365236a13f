"""The context worker: the OS process that alone owns a model's llama.cpp context.

Started by the model's supervisor as ``worker_main(channel, spec)`` in a fresh
interpreter (`supervisors.ProcessChild`: no fork, and the user's ``__main__``
is never imported). It loads the backend, says ``("ready", info)`` or
``("load_failed", reason)``, then serves one command at a time until its
channel closes. An abort or a segfault inside llama.cpp kills only this
process; the runtime sees the channel close and the supervisor restarts it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from erllama_py.errors import ErllamaError, ModelLoadError
from erllama_py.model.backend import Backend, Generate, Prefill
from erllama_py.model.mapcache import MappingCache
from erllama_py.model.protocol import (
    FD_MARK,
    ChatTemplate,
    ClearSeq,
    Command,
    Detokenize,
    Embed,
    FreeSampler,
    NewSampler,
    Pack,
    Reset,
    SeqLen,
    Step,
    Tokenize,
    Truncate,
    Unpack,
    WorkerSpec,
)
from erllama_py.model.statebuf import StateBuffer
from supervisors import Channel

__all__ = ["load_backend", "worker_main"]


def load_backend(spec: WorkerSpec) -> Backend:
    """Build the backend the spec names.

    Raises:
        ModelLoadError: the model cannot be loaded.
    """
    # Imported here so that a stub worker never loads llama.cpp's libraries.
    if spec.backend == "stub":
        from erllama_py.model.stub_backend import StubBackend  # noqa: PLC0415

        options = dict(spec.stub)
        return StubBackend(
            n_ctx=spec.n_ctx, n_batch=spec.n_batch, n_seq_max=spec.n_seq_max, **options
        )
    if spec.model_path is None:
        raise ModelLoadError("no model_path given", spec.model)
    from erllama_py.model.llama_backend import LlamaBackend  # noqa: PLC0415

    return LlamaBackend.load(
        spec.model_path,
        n_ctx=spec.n_ctx,
        n_batch=spec.n_batch,
        n_seq_max=spec.n_seq_max,
        n_threads=spec.n_threads,
    )


class _Server:
    def __init__(self, channel: Channel, backend: Backend) -> None:
        self.channel = channel
        self.backend = backend
        self.samplers: set[int] = set()
        self.mappings = MappingCache()

    def serve(self) -> None:
        while True:
            try:
                command = self.channel.recv()
            except (EOFError, OSError):
                return
            buffer: StateBuffer | None = None
            try:
                if isinstance(command, Unpack):
                    buffer = self._receive_buffer(command.size)
                result = self.handle(command, buffer)
            except ErllamaError as exc:
                self.channel.send(
                    ("error", type(exc).__name__, str(exc), getattr(exc, "param", None))
                )
                continue
            except Exception as exc:  # a bug or a llama-cpp-python error: report, keep serving
                self.channel.send(("error", type(exc).__name__, repr(exc), None))
                continue
            finally:
                if buffer is not None and not self.mappings.owns(buffer):
                    buffer.close()
            if isinstance(result, StateBuffer):
                self._send_buffer(result)
            else:
                self.channel.send(("ok", result))

    def _receive_buffer(self, size: int) -> StateBuffer:
        _data, fds = self.channel.recv_fds(len(FD_MARK), 1)
        if not fds:
            raise ModelLoadError("unpack: no descriptor received")
        return self.mappings.open(fds[0], size)

    def _send_buffer(self, buffer: StateBuffer) -> None:
        try:
            self.channel.send(("ok_fd", buffer.size))
            self.channel.send_fds(FD_MARK, [buffer.fd])
        finally:
            buffer.close()

    def handle(self, command: Command, buffer: StateBuffer | None) -> Any:
        b = self.backend
        if isinstance(command, Step):
            return self._step(command)
        if isinstance(command, Tokenize):
            return b.tokenize(command.text, command.add_special, command.parse_special)
        if isinstance(command, Detokenize):
            return b.detokenize(command.tokens, command.special)
        if isinstance(command, ChatTemplate):
            return b.apply_chat_template(
                command.messages, command.add_generation_prompt, command.template
            )
        if isinstance(command, NewSampler):
            sampler = b.new_sampler(command.config, command.history)
            self.samplers.add(sampler)
            return sampler
        if isinstance(command, FreeSampler):
            self.samplers.discard(command.sampler)
            b.free_sampler(command.sampler)
            return None
        if isinstance(command, Pack):
            return b.pack(command.seq, canonical=command.canonical)
        if isinstance(command, Unpack):
            assert buffer is not None
            return b.unpack(command.seq, buffer)
        if isinstance(command, Truncate):
            return b.truncate(command.seq, command.n)
        if isinstance(command, ClearSeq):
            b.clear_seq(command.seq)
            return None
        if isinstance(command, SeqLen):
            return b.seq_len(command.seq)
        if isinstance(command, Embed):
            return b.embed(command.tokens)
        if isinstance(command, Reset):
            for sampler in sorted(self.samplers):
                b.free_sampler(sampler)
            self.samplers.clear()
            for seq in range(b.info.n_seq_max):
                b.clear_seq(seq)
            return None
        raise TypeError(f"unknown worker command {command!r}")

    def _step(self, command: Step) -> list[tuple[Any, ...] | None]:
        ops: list[Prefill | Generate] = []
        created: dict[int, int] = {}  # op index -> sampler created for it
        try:
            for i, op in enumerate(command.ops):
                if op[0] == "prefill":
                    ops.append(Prefill(op[1], op[2]))
                    continue
                sampler = op[2]
                if not isinstance(sampler, int):  # (config, history): create it now
                    sampler = self.backend.new_sampler(sampler[0], sampler[1])
                    self.samplers.add(sampler)
                    created[i] = sampler
                ops.append(Generate(op[1], sampler, op[3]))
            results = self.backend.step(ops)
        except BaseException:
            for sampler in created.values():
                self.samplers.discard(sampler)
                self.backend.free_sampler(sampler)
            raise
        out: list[tuple[Any, ...] | None] = []
        for i, result in enumerate(results):
            if result is None:
                out.append(None)
                continue
            piece = b"" if result.eog else self.backend.token_piece(result.token)
            if i in created:
                out.append((result.token, result.eog, piece, created[i]))
            else:
                out.append((result.token, result.eog, piece))
        return out


def _redirect_stderr(spec: WorkerSpec) -> None:
    path = spec.log_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    print(f"--- worker pid {os.getpid()} for model {spec.model!r}", file=sys.stderr)


def worker_main(channel: Channel, spec: WorkerSpec) -> None:
    """Entry point of a context worker process (see the module docstring)."""
    _redirect_stderr(spec)
    try:
        backend = load_backend(spec)
    except ErllamaError as exc:
        channel.send(("load_failed", str(exc)))
        return
    except Exception as exc:
        channel.send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return
    try:
        channel.send(("ready", backend.info.to_dict()))
        _Server(channel, backend).serve()
    finally:
        backend.close()
