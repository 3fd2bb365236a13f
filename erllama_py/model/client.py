"""The runtime's side of the worker protocol: start a worker, call it, notice its death.

`start_worker` spawns a context worker and waits for its handshake, so that a
model that cannot load fails ``load_model`` with a clear `ModelLoadError` and
leaves no process behind. `WorkerClient` sends one command at a time; when
the worker dies under a call, the call raises `WorkerCrashedError` naming the
exit code or signal as soon as the channel closes (no polling).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar, cast

from erllama_py.errors import ModelLoadError, WorkerCrashedError
from erllama_py.model.arena import Arena, ArenaSlice
from erllama_py.model.backend import BackendInfo
from erllama_py.model.protocol import (
    FD_MARK,
    ChatTemplate,
    ClearSeq,
    Command,
    Detokenize,
    Embed,
    Failed,
    FreeSampler,
    LoadFailed,
    NewSampler,
    Ok,
    Pack,
    Ready,
    Reply,
    Reset,
    SamplerSpec,
    SeqLen,
    SlotGranted,
    SlotRefused,
    SlotWanted,
    Step,
    StepOp,
    Tokenize,
    TokenOut,
    Truncate,
    Unpack,
    WorkerSpec,
    raise_remote,
)
from erllama_py.model.statebuf import StateBuffer
from erllama_py.params import ChatMessage, Tool
from supervisors import ProcessChild

__all__ = ["WorkerClient", "log_tail", "start_worker"]

R = TypeVar("R")
WORKER_TARGET = "erllama_py.model.worker:worker_main"
DEFAULT_LOAD_TIMEOUT_S = 120.0


def log_tail(path: Path | None, limit: int = 2000) -> str:
    """The end of a worker's log (where llama.cpp's abort messages go), or ''."""
    if path is None:
        return ""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    marker = text.rfind("--- worker pid")
    return text[marker:].strip() if marker != -1 else text.strip()


def _abort_line(tail: str) -> str:
    for line in reversed(tail.splitlines()):
        if "abort" in line.lower() or "error" in line.lower() or "assert" in line.lower():
            return line.strip()
    return ""


def start_worker(
    spec: WorkerSpec, timeout: float = DEFAULT_LOAD_TIMEOUT_S
) -> tuple[ProcessChild, BackendInfo]:
    """Spawn a context worker and wait until its model is loaded.

    Raises:
        ModelLoadError: the model could not be loaded, the worker died while
            loading (an abort in llama.cpp, for example), or it took longer than
            `timeout`. No process is left running.
    """
    process = ProcessChild.spawn(WORKER_TARGET, spec, name=f"worker:{spec.model}")
    try:
        if not process.channel.poll(timeout):
            raise ModelLoadError(f"the worker did not load the model in {timeout:g} s", spec.model)
        hello = process.channel.recv()
    except (EOFError, OSError):
        process.wait(5.0)
        tail = log_tail(spec.log_file())
        detail = _abort_line(tail)
        how = f"exit code {process.exitcode}" if process.signal is None else process.signal
        message = f"the worker died while loading the model ({how})"
        raise ModelLoadError(f"{message}: {detail}" if detail else message, spec.model) from None
    except BaseException:
        _kill(process)
        raise
    if not isinstance(hello, Ready):
        _kill(process)
        why = hello.reason if isinstance(hello, LoadFailed) else f"unexpected {hello!r}"
        raise ModelLoadError(f"cannot load model {spec.model!r}: {why}", spec.model)
    return process, hello.info


def _kill(process: ProcessChild) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        process.kill()
    process.wait(5.0)
    with contextlib.suppress(OSError):
        process.close()


def _nothing() -> bool:
    return True


class WorkerClient:
    """Calls one worker process. Thread-safe (one call at a time)."""

    def __init__(self, model: str, process: ProcessChild, info: BackendInfo) -> None:
        self.model = model
        self.process = process
        self.info = info
        self._lock = threading.Lock()
        self._segments_sent: set[int] = set()  # arena segments this worker has mapped

    @property
    def pid(self) -> int:
        return self.process.pid

    def crashed(self) -> WorkerCrashedError:
        """The error describing this worker's death (waits up to 1 s for its exit code)."""
        self.process.wait(1.0)
        return WorkerCrashedError(self.model, self.process.exitcode)

    def call(self, command: Command[R]) -> R:
        """Send a command, return its result.

        Raises:
            WorkerCrashedError: the worker died (before or during the call).
            InvalidRequestError, ContextOverflowError, CacheFormatError, ModelError:
                the worker refused it.
        """
        with self._lock:
            try:
                self.process.channel.send(command)
                reply: Reply = self.process.channel.recv()
            except (EOFError, OSError):
                raise self.crashed() from None
        return cast(R, self._value(reply))

    def _value(self, reply: Reply) -> object:
        if isinstance(reply, Ok):
            return reply.value
        if isinstance(reply, Failed):
            raise_remote(self.model, reply)
        raise AssertionError(f"unexpected worker reply {reply!r}")

    # ------------------------------------------------------------------ typed commands

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return self.call(Tokenize(text, add_special, parse_special))

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return self.call(Detokenize(list(tokens), special))

    def chat_template(
        self,
        messages: Sequence[ChatMessage],
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> str:
        return self.call(ChatTemplate(list(messages), True, template, tools))

    def new_sampler(self, spec: SamplerSpec) -> int:
        return self.call(NewSampler(spec))

    def free_sampler(self, sampler: int) -> None:
        self.call(FreeSampler(sampler))

    def step(self, ops: Sequence[StepOp]) -> list[TokenOut | None]:
        """One tick: per op, None (prefill) or the `TokenOut` of a generate op."""
        return self.call(Step(list(ops)))

    def truncate(self, seq: int, n: int) -> bool:
        return self.call(Truncate(seq, n))

    def clear_seq(self, seq: int) -> None:
        self.call(ClearSeq(seq))

    def seq_len(self, seq: int) -> int:
        return self.call(SeqLen(seq))

    def embed(self, tokens: Sequence[int]) -> list[float]:
        return self.call(Embed(list(tokens)))

    def reset(self) -> None:
        self.call(Reset())

    def pack(self, seq: int, arena: Arena, canonical: bool = False) -> ArenaSlice:
        """Save a sequence into a new slot of `arena` (the worker writes it: no copy).

        Raises:
            WorkerCrashedError: the worker died.
            OSError: no memory or descriptor for the slot, here or in the worker
                (``errno`` says which).
            InvalidRequestError, ModelError: the worker refused it.
        """
        with self._lock:
            slot: ArenaSlice | None = None
            refused: OSError | None = None
            try:
                try:
                    self.process.channel.send(Pack(seq, canonical))
                    reply: Reply = self.process.channel.recv()
                    if isinstance(reply, SlotWanted):
                        try:
                            slot = arena.allocate(reply.size)
                        except OSError as exc:
                            refused = exc
                            self.process.channel.send(SlotRefused(str(exc)))
                        else:
                            self._send_slot(slot)
                        reply = self.process.channel.recv()
                except (EOFError, OSError):
                    raise self.crashed() from None
                if refused is not None:
                    raise refused
                if isinstance(reply, Failed):
                    self._segments_sent.clear()  # resend descriptors: the worker may lack one
                    if reply.errno is not None:
                        raise OSError(reply.errno, f"worker: {reply.message}")
                self._value(reply)
            except BaseException:
                if slot is not None:
                    slot.close()
                raise
        assert slot is not None
        return slot

    def _send_slot(self, slot: ArenaSlice) -> None:
        fresh = slot.segment_id not in self._segments_sent
        self.process.channel.send(SlotGranted(slot.ref(fd_follows=fresh)))
        if fresh:
            self.process.channel.send_fds(FD_MARK, [slot.segment_fd])
            self._segments_sent.add(slot.segment_id)

    def unpack(
        self,
        seq: int,
        buffer: StateBuffer | ArenaSlice,
        size: int | None = None,
        meanwhile: Callable[[], bool] = _nothing,
    ) -> tuple[int, bool]:
        """Restore a sequence from the first `size` bytes (default: all) of a shared
        buffer or an arena slot; returns the tokens restored and what `meanwhile`
        returned.

        `meanwhile` runs in this thread while the worker restores (a checksum
        of the buffer, say); the reply is read after it, even if it raises.

        Raises:
            WorkerCrashedError: the worker died.
            OSError: the worker could not map the buffer (no descriptor or memory).
            CacheFormatError, ContextOverflowError, ModelError: it refused the state.
        """
        n = buffer.size if size is None else size
        with self._lock:
            try:
                if isinstance(buffer, ArenaSlice):
                    fresh = buffer.segment_id not in self._segments_sent
                    slot = buffer.ref(fd_follows=fresh)
                    self.process.channel.send(Unpack(seq, n, slot))
                    if fresh:
                        self.process.channel.send_fds(FD_MARK, [buffer.segment_fd])
                        self._segments_sent.add(buffer.segment_id)
                else:
                    self.process.channel.send(Unpack(seq, n))
                    self.process.channel.send_fds(FD_MARK, [buffer.fd])
            except (EOFError, OSError):
                raise self.crashed() from None
            try:
                verdict = meanwhile()
            finally:
                try:
                    reply: Reply = self.process.channel.recv()
                except (EOFError, OSError):
                    raise self.crashed() from None
        if isinstance(reply, Failed) and reply.errno is not None:
            self._segments_sent.clear()  # resend descriptors: the worker may lack one
            raise OSError(reply.errno, f"worker: {reply.message}")
        return cast(int, self._value(reply)), verdict


def wait_until_dead(process: ProcessChild, timeout: float) -> bool:
    """Wait for a process to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.wait(0.05) is not None:
            return True
    return process.exitcode is not None
