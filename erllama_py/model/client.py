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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erllama_py.errors import ModelLoadError, WorkerCrashedError
from erllama_py.model.backend import BackendInfo
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
    StepOp,
    Tokenize,
    Truncate,
    Unpack,
    WorkerSpec,
    raise_remote,
)
from erllama_py.model.statebuf import StateBuffer
from supervisors import ProcessChild

__all__ = ["WorkerClient", "start_worker", "log_tail"]

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
        kind, value = process.channel.recv()
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
    if kind != "ready":
        _kill(process)
        raise ModelLoadError(f"cannot load model {spec.model!r}: {value}", spec.model)
    return process, BackendInfo.from_dict(value)


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

    def call(self, command: Command) -> Any:
        """Send a command, return its result.

        Raises:
            WorkerCrashedError: the worker died (before or during the call).
            InvalidRequestError, ContextOverflowError, ModelError: the worker refused it.
        """
        with self._lock:
            try:
                self.process.channel.send(command)
                reply = self.process.channel.recv()
            except (EOFError, OSError):
                raise self.crashed() from None
        return self._result(reply)

    def _result(self, reply: tuple[Any, ...]) -> Any:
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "error":
            raise_remote(self.model, reply[1], reply[2], reply[3])
        raise AssertionError(f"unexpected worker reply {reply[0]!r}")

    # ------------------------------------------------------------------ typed commands

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return list(self.call(Tokenize(text, add_special, parse_special)))

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return bytes(self.call(Detokenize(list(tokens), special)))

    def chat_template(
        self, messages: Sequence[Mapping[str, Any]], template: str | None = None
    ) -> str:
        return str(self.call(ChatTemplate([dict(m) for m in messages], True, template)))

    def new_sampler(self, config: Mapping[str, Any], history: Sequence[int]) -> int:
        return int(self.call(NewSampler(dict(config), list(history))))

    def free_sampler(self, sampler: int) -> None:
        self.call(FreeSampler(sampler))

    def step(self, ops: Sequence[StepOp]) -> list[tuple[Any, ...] | None]:
        """One tick. Per op: None (prefill) or (token, eog, piece bytes[, id of the
        sampler created for a ``gen`` op that sent its config instead of an id])."""
        result: list[tuple[Any, ...] | None] = self.call(Step(list(ops)))
        return result

    def truncate(self, seq: int, n: int) -> bool:
        return bool(self.call(Truncate(seq, n)))

    def clear_seq(self, seq: int) -> None:
        self.call(ClearSeq(seq))

    def seq_len(self, seq: int) -> int:
        return int(self.call(SeqLen(seq)))

    def embed(self, tokens: Sequence[int]) -> list[float]:
        return list(self.call(Embed(list(tokens))))

    def reset(self) -> None:
        self.call(Reset())

    def pack(self, seq: int, canonical: bool = False) -> StateBuffer:
        """Save a sequence into a new shared buffer (its pages are the worker's: no copy)."""
        with self._lock:
            try:
                self.process.channel.send(Pack(seq, canonical))
                reply = self.process.channel.recv()
                if reply[0] != "ok_fd":
                    self._result(reply)
                    raise AssertionError("pack replied without a buffer")
                _data, fds = self.process.channel.recv_fds(len(FD_MARK), 1)
            except (EOFError, OSError):
                raise self.crashed() from None
        return StateBuffer.from_fd(fds[0], reply[1], take_ownership=True)

    def unpack(self, seq: int, buffer: StateBuffer, size: int | None = None) -> int:
        """Restore a sequence from the first `size` bytes (default: all) of a shared
        buffer; returns the tokens restored."""
        with self._lock:
            try:
                self.process.channel.send(Unpack(seq, buffer.size if size is None else size))
                self.process.channel.send_fds(FD_MARK, [buffer.fd])
                reply = self.process.channel.recv()
            except (EOFError, OSError):
                raise self.crashed() from None
        return int(self._result(reply))


def wait_until_dead(process: ProcessChild, timeout: float) -> bool:
    """Wait for a process to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.wait(0.05) is not None:
            return True
    return process.exitcode is not None
