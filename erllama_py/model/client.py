"""The runtime's side of the worker protocol: start a worker, call it, notice its death.

`start_worker` spawns a context worker and waits for its handshake, so that a
model that cannot load fails ``load_model`` with a clear `ModelLoadError` and
leaves no process behind. `WorkerClient` sends one command at a time; when
the worker dies under a call, the call raises `WorkerCrashedError` naming the
exit code or signal as soon as the channel closes (no polling).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar, cast

from erllama_py.errors import ModelLoadError, WorkerCrashedError
from erllama_py.model.arena import Arena, ArenaSlice
from erllama_py.model.backend import BackendInfo, Prefill
from erllama_py.model.deadline import WorkerDeadline
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
    Unpacked,
    Verdict,
    WorkerSpec,
    raise_remote,
)
from erllama_py.model.statebuf import StateBuffer
from erllama_py.params import ChatMessage, Tool
from supervisors import ProcessChild

__all__ = ["WorkerClient", "log_tail", "start_worker"]

log = logging.getLogger("erllama_py.model")
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


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _passes(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:  # a check that cannot run has not passed
        log.warning("the check of a payload being restored failed", exc_info=True)
        return False


def _set_socket_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """A kernel-level timeout on the channel's socket (not socket.settimeout, which would
    make the descriptor non-blocking for the Connection sharing it): a send into a stopped
    worker's full socket buffer, or a reply that does not come, ends with EAGAIN.

    The reply is awaited by the blocking read itself, never by a poll followed by a read:
    when the worker dies, its supervisor closes this channel and starts a successor whose
    socket may reuse the descriptor's number, and a read issued after that would wait on
    the successor's socket. A read already blocked when the worker dies sees EOF at once.
    """
    with contextlib.suppress(OSError):  # a closed channel: the call itself then fails
        sock.setsockopt(socket.SOL_SOCKET, option, _timeval(seconds))


def _work(command: Command[object]) -> int:
    """Tokens a command decodes: what its deadline scales with (0: the floor)."""
    if isinstance(command, Step):
        return sum(len(op.tokens) if isinstance(op, Prefill) else 1 for op in command.ops)
    if isinstance(command, Embed):
        return len(command.tokens)
    return 0


class WorkerClient:
    """Calls one worker process. Thread-safe (one call at a time).

    Every call has a deadline (`WorkerDeadline`): a worker that does not answer in
    time is taken as hung, killed (its supervisor restarts it), and the call raises
    `WorkerCrashedError` with ``hung_s`` set.
    """

    def __init__(
        self,
        model: str,
        process: ProcessChild,
        info: BackendInfo,
        deadline: WorkerDeadline | None = None,
    ) -> None:
        self.model = model
        self.process = process
        self.info = info
        self.deadline = deadline or WorkerDeadline()
        self._lock = threading.Lock()
        self._segments_sent: set[int] = set()  # arena segments this worker has mapped
        _set_socket_timeout(process.channel.socket, socket.SO_SNDTIMEO, self.deadline.floor_s)

    @property
    def pid(self) -> int:
        return self.process.pid

    def crashed(self) -> WorkerCrashedError:
        """The error describing this worker's death (waits up to 1 s for its exit code)."""
        self.process.wait(1.0)
        return WorkerCrashedError(self.model, self.process.exitcode)

    def _kill_hung(self, deadline_s: float) -> WorkerCrashedError:
        log.warning(
            "model %s: context worker %d did not answer within %g s; killing it",
            self.model,
            self.process.pid,
            deadline_s,
        )
        with contextlib.suppress(ProcessLookupError, OSError):
            self.process.kill()
        self.process.wait(5.0)
        return WorkerCrashedError(self.model, self.process.exitcode, hung_s=deadline_s)

    def _arm(self, deadline_s: float) -> None:
        """Bound every read of the coming call's reply by its deadline."""
        _set_socket_timeout(self.process.channel.socket, socket.SO_RCVTIMEO, deadline_s)

    def _await_reply(self) -> Reply:
        reply: Reply = self.process.channel.recv()
        return reply

    def call(self, command: Command[R]) -> R:
        """Send a command, return its result.

        Raises:
            WorkerCrashedError: the worker died (before or during the call), or it
                missed the call's deadline and was killed (``hung_s`` set).
            InvalidRequestError, ContextOverflowError, CacheFormatError, ModelError:
                the worker refused it.
        """
        tokens = _work(command)
        deadline_s = self.deadline.for_work(tokens)
        with self._lock:
            started = time.monotonic()
            try:
                self._arm(deadline_s)
                self.process.channel.send(command)
                reply = self._await_reply()
            except BlockingIOError:  # no answer within the deadline (or a send timed out)
                raise self._kill_hung(deadline_s) from None
            except (EOFError, OSError):
                raise self.crashed() from None
        if isinstance(command, Step):
            self.deadline.record(tokens, time.monotonic() - started)
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

    def move_seq(self, src: int, dst: int) -> None:
        self.call(MoveSeq(src, dst))

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
        deadline_s = self.deadline.for_work()
        with self._lock:
            slot: ArenaSlice | None = None
            refused: OSError | None = None
            try:
                try:
                    self._arm(deadline_s)
                    self.process.channel.send(Pack(seq, canonical))
                    reply = self._await_reply()
                    if isinstance(reply, SlotWanted):
                        try:
                            slot = arena.allocate(reply.size)
                        except OSError as exc:
                            refused = exc
                            self.process.channel.send(SlotRefused(str(exc)))
                        else:
                            self._send_slot(slot)
                        reply = self._await_reply()
                except BlockingIOError:  # no answer within the deadline (or a send timed out)
                    raise self._kill_hung(deadline_s) from None
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
        *,
        check: Callable[[], bool] | None = None,
        then: GenerateOp | None = None,
    ) -> Unpacked:
        """Restore a sequence from the first `size` bytes (default: all) of a shared
        buffer or an arena slot (see `Unpack`). `check` (a checksum of the payload,
        say) runs in this thread while the worker restores; its verdict goes to the
        worker, which samples `then` only if it passed (an exception counts as a fail).

        Raises:
            WorkerCrashedError: the worker died.
            OSError: the worker could not map the buffer (no descriptor or memory).
            CacheFormatError, ContextOverflowError, ModelError: it refused the state.
        """
        n = buffer.size if size is None else size
        deadline_s = self.deadline.for_work(0 if then is None else 1)
        with self._lock:
            try:
                self._arm(deadline_s)
                if isinstance(buffer, ArenaSlice):
                    fresh = buffer.segment_id not in self._segments_sent
                    slot = buffer.ref(fd_follows=fresh)
                    self.process.channel.send(Unpack(seq, n, slot, check is not None, then))
                    if fresh:
                        self.process.channel.send_fds(FD_MARK, [buffer.segment_fd])
                        self._segments_sent.add(buffer.segment_id)
                else:
                    self.process.channel.send(Unpack(seq, n, None, check is not None, then))
                    self.process.channel.send_fds(FD_MARK, [buffer.fd])
                if check is not None:
                    self.process.channel.send(Verdict(_passes(check)))
                reply = self._await_reply()
            except BlockingIOError:  # no answer within the deadline (or a send timed out)
                raise self._kill_hung(deadline_s) from None
            except (EOFError, OSError):
                raise self.crashed() from None
        if isinstance(reply, Failed) and reply.errno is not None:
            self._segments_sent.clear()  # resend descriptors: the worker may lack one
            raise OSError(reply.errno, f"worker: {reply.message}")
        return cast(Unpacked, self._value(reply))


def wait_until_dead(process: ProcessChild, timeout: float) -> bool:
    """Wait for a process to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.wait(0.05) is not None:
            return True
    return process.exitcode is not None
