"""The context worker: the OS process that alone owns a model's llama.cpp context.

Started by the model's supervisor as ``worker_main(channel, spec)`` in a fresh
interpreter (`supervisors.ProcessChild`: no fork, and the user's ``__main__``
is never imported). It loads the backend, says `Ready` or `LoadFailed`
(`erllama_py.model.protocol`), then serves one command at a time until its
channel closes. An abort or a segfault inside llama.cpp kills only this
process; the runtime sees the channel close and the supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

from erllama_py.errors import CHECKSUM_MISMATCH, CacheFormatError, ErllamaError, ModelLoadError
from erllama_py.model.arena import SlotRef
from erllama_py.model.backend import Backend, Generate, Prefill
from erllama_py.model.mapcache import MappingCache
from erllama_py.model.protocol import (
    FD_MARK,
    ChatTemplate,
    ClearSeq,
    Command,
    Detokenize,
    Embed,
    Failed,
    FreeSampler,
    GenerateOp,
    LoadFailed,
    MoveSeq,
    NewSampler,
    Ok,
    Pack,
    Ready,
    Reset,
    SamplerSpec,
    SeqLen,
    SlotGranted,
    SlotRefused,
    SlotWanted,
    Step,
    Tokenize,
    TokenOut,
    Truncate,
    Unpack,
    Unpacked,
    Verdict,
    WorkerSpec,
)
from erllama_py.model.statebuf import PackTarget, StateBuffer
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
            n_ctx=spec.n_ctx,
            n_batch=spec.n_batch,
            n_seq_max=spec.n_seq_max,
            **options,  # type: ignore[arg-type]  # validated by config._stub
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


def _failed(exc: Exception) -> Failed:
    if isinstance(exc, ErllamaError):
        reason = exc.reason if isinstance(exc, CacheFormatError) else None
        return Failed(type(exc).__name__, str(exc), getattr(exc, "param", None), reason)
    if isinstance(exc, OSError):
        return Failed(type(exc).__name__, str(exc), errno=exc.errno)
    return Failed(type(exc).__name__, repr(exc))  # a bug or a llama-cpp-python error


class SlotRefusedError(Exception):
    """The runtime had no arena slot for a pack."""


class _Server:
    def __init__(self, channel: Channel, backend: Backend) -> None:
        self.channel = channel
        self.backend = backend
        self.samplers: set[int] = set()
        self.mappings = MappingCache()
        # The runtime's arena segments this worker was sent, by id (a few; see arena.py).
        self.segments: dict[int, StateBuffer] = {}
        self._verdict_due = False  # an Unpack's Verdict frame is still to be read

    def serve(self) -> None:
        while True:
            try:
                command = self.channel.recv()
            except (EOFError, OSError):
                return
            buffer: StateBuffer | memoryview | None = None
            self._verdict_due = isinstance(command, Unpack) and command.verdict_follows
            reply: Ok | Failed
            try:
                if isinstance(command, Unpack):
                    buffer = self._receive_buffer(command)
                reply = Ok(self.handle(command, buffer))
            except Exception as exc:  # reported to the caller; the worker keeps serving
                reply = _failed(exc)
            finally:
                if isinstance(buffer, memoryview):
                    with contextlib.suppress(BufferError):  # an export the backend still holds
                        buffer.release()
                elif buffer is not None and not self.mappings.owns(buffer):
                    buffer.close()
            try:
                if self._verdict_due:  # sent whatever happened here: read it, keep in step
                    self._take_verdict()
            except (EOFError, OSError):
                return
            self.channel.send(reply)

    def _receive_buffer(self, command: Unpack) -> StateBuffer | memoryview:
        if command.slot is not None:
            segment = self._segment(command.slot)
            slot = command.slot
            return segment.view()[slot.offset : slot.offset + command.size]
        _data, fds = self.channel.recv_fds(len(FD_MARK), 1)
        if not fds:
            raise ModelLoadError("unpack: no descriptor received")
        return self.mappings.open(fds[0], command.size)

    def _segment(self, slot: SlotRef) -> StateBuffer:
        """The mapping of the slot's segment (received now if its descriptor follows)."""
        if slot.fd_follows:
            _data, fds = self.channel.recv_fds(len(FD_MARK), 1)
            if not fds:
                raise OSError(errno.EMFILE, "no segment descriptor received")
            old = self.segments.pop(slot.segment, None)
            if old is not None:
                with contextlib.suppress(BufferError):
                    old.close()
            self.segments[slot.segment] = StateBuffer.from_fd(
                fds[0], slot.segment_size, writable=True, take_ownership=True
            )
        segment = self.segments.get(slot.segment)
        if segment is None:
            raise OSError(
                errno.EBADF, f"arena segment {slot.segment} was never sent to this worker"
            )
        if slot.offset + slot.size > segment.size:
            raise ValueError(f"slot {slot} outside its segment")
        return segment

    def _slot(self, size: int) -> PackTarget:
        """Ask the runtime for an arena slot of `size` bytes (see protocol.Pack)."""
        self.channel.send(SlotWanted(size))
        answer = self.channel.recv()
        if isinstance(answer, SlotRefused):
            raise SlotRefusedError(answer.reason)
        assert isinstance(answer, SlotGranted), f"unexpected answer {answer!r}"
        slot = answer.slot
        if slot.size != size:
            raise ValueError(f"granted {slot.size} bytes, {size} wanted")
        return self._segment(slot).target(slot.offset, slot.size)

    def handle(self, command: Command[object], buffer: StateBuffer | memoryview | None) -> object:
        b = self.backend
        match command:
            case Step():
                return self._step(command)
            case Tokenize(text, add_special, parse_special):
                return b.tokenize(text, add_special, parse_special)
            case Detokenize(tokens, special):
                return b.detokenize(tokens, special)
            case ChatTemplate(messages, add_generation_prompt, template, tools):
                return b.apply_chat_template(messages, add_generation_prompt, template, tools)
            case NewSampler(spec):
                return self._new_sampler(spec)
            case FreeSampler(sampler):
                self.samplers.discard(sampler)
                b.free_sampler(sampler)
                return None
            case Pack(seq, canonical):
                return b.pack_into(seq, self._slot, canonical=canonical)
            case Unpack():
                assert buffer is not None
                return self._unpack(command, buffer)
            case Truncate(seq, n):
                return b.truncate(seq, n)
            case ClearSeq(seq):
                b.clear_seq(seq)
                return None
            case MoveSeq(src, dst):
                b.move_seq(src, dst)
                return None
            case SeqLen(seq):
                return b.seq_len(seq)
            case Embed(tokens):
                return b.embed(tokens)
            case Reset():
                for sampler in sorted(self.samplers):
                    b.free_sampler(sampler)
                self.samplers.clear()
                for seq in range(b.info.n_seq_max):
                    b.clear_seq(seq)
                return None
        raise TypeError(f"unknown worker command {command!r}")

    def _unpack(self, command: Unpack, buffer: StateBuffer | memoryview) -> Unpacked:
        """Restore; when the runtime checks the payload meanwhile, wait for its verdict
        before sampling `then`, and clear the sequence if the check failed."""
        try:
            n = self.backend.unpack(command.seq, buffer)
        except CacheFormatError:
            if self._verdict_due and not self._take_verdict():
                raise CacheFormatError(CHECKSUM_MISMATCH, "the payload's bytes changed") from None
            raise
        if self._verdict_due and not self._take_verdict():
            self.backend.clear_seq(command.seq)
            return Unpacked(n, verified=False)
        if command.then is None:
            return Unpacked(n)
        return Unpacked(n, first=self._step(Step((command.then,)))[0])

    def _take_verdict(self) -> bool:
        """Read the runtime's `Verdict` on the payload of the current `Unpack`."""
        self._verdict_due = False
        verdict = self.channel.recv()
        if not isinstance(verdict, Verdict):  # out of step with the runtime: be restarted
            raise SystemExit(f"worker: expected the unpack's verdict, got {verdict!r}")
        return verdict.verified

    def _new_sampler(self, spec: SamplerSpec) -> int:
        sampler = self.backend.new_sampler(spec.params, spec.history)
        self.samplers.add(sampler)
        return sampler

    def _step(self, command: Step) -> list[TokenOut | None]:
        ops: list[Prefill | Generate] = []
        created: dict[int, int] = {}  # op index -> sampler created for it
        try:
            for i, op in enumerate(command.ops):
                if isinstance(op, Prefill):
                    ops.append(op)
                    continue
                assert isinstance(op, GenerateOp)
                sampler = op.sampler
                if isinstance(sampler, SamplerSpec):
                    sampler = created[i] = self._new_sampler(sampler)
                ops.append(Generate(op.seq, sampler, op.pending, op.logprobs))
            results = self.backend.step(ops)
        except BaseException:
            for sampler in created.values():
                self.samplers.discard(sampler)
                self.backend.free_sampler(sampler)
            raise
        out: list[TokenOut | None] = []
        for i, result in enumerate(results):
            if result is None:
                out.append(None)
                continue
            piece = b"" if result.eog else self.backend.token_piece(result.token)
            top = tuple((t, lp, self.backend.token_piece(t)) for t, lp in result.top)
            out.append(
                TokenOut(result.token, result.eog, piece, created.get(i), result.logprob, top)
            )
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
        channel.send(LoadFailed(str(exc)))
        return
    except Exception as exc:
        channel.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    try:
        channel.send(Ready(backend.info))
        _Server(channel, backend).serve()
    finally:
        backend.close()
