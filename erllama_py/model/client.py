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
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar, cast

from erllama_py.errors import ModelLoadError, WorkerCrashedError
from erllama_py.model.backend import BackendInfo
from erllama_py.model.protocol import (
    FD_MARK,
    BufferFollows,
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


class WorkerClient:
    """Calls one worker process. Thread-safe (one call at a time)."""

    def __init__(self, model: str, process: ProcessChild, info: BackendInfo) -> None:
        self.model = model
        self.process = process
        self.info = info
        self._lock = threading.Lock()

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

    def pack(self, seq: int, canonical: bool = False) -> StateBuffer:
        """Save a sequence into a new shared buffer (its pages are the worker's: no copy)."""
        with self._lock:
            try:
                self.process.channel.send(Pack(seq, canonical))
                reply: Reply = self.process.channel.recv()
                if not isinstance(reply, BufferFollows):
                    self._value(reply)
                    raise AssertionError("pack replied without a buffer")
                _data, fds = self.process.channel.recv_fds(len(FD_MARK), 1)
            except (EOFError, OSError):
                raise self.crashed() from None
        return StateBuffer.from_fd(fds[0], reply.size, take_ownership=True)

    def unpack(self, seq: int, buffer: StateBuffer, size: int | None = None) -> int:
        """Restore a sequence from the first `size` bytes (default: all) of a shared
        buffer; returns the tokens restored."""
        with self._lock:
            try:
                self.process.channel.send(Unpack(seq, buffer.size if size is None else size))
                self.process.channel.send_fds(FD_MARK, [buffer.fd])
                reply: Reply = self.process.channel.recv()
            except (EOFError, OSError):
                raise self.crashed() from None
        return cast(int, self._value(reply))


def wait_until_dead(process: ProcessChild, timeout: float) -> bool:
    """Wait for a process to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.wait(0.05) is not None:
            return True
    return process.exitcode is not None
