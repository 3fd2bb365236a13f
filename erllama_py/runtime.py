"""The public runtime: load models, complete prompts (sync, streaming, asyncio), inspect.

`erllama_py.start(config)` returns a `Runtime`. Every call validates its
arguments before anything is queued (a clear error, never a hang), and every
result is a plain, JSON-serialisable dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from typing import Any

import pykka

from erllama_py.app import REGISTRY_NAME, Tree, start_tree
from erllama_py.config import Config, load_config, parse_model
from erllama_py.errors import (
    ErllamaError,
    InvalidRequestError,
    ModelFailedError,
    RuntimeStoppedError,
)
from erllama_py.model.actor import Cancel, Submit
from erllama_py.model.request import Event, Request, RequestSink
from erllama_py.model.shared import actor_name, sup_name
from erllama_py.params import parse_options
from supervisors import NoProcError, tree, which_children

__all__ = ["EventStream", "Runtime", "start"]

ACTOR_WAIT_S = 30.0  # a restarting model actor is waited for this long
LOAD_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 60.0


def start(config: str | Path | Mapping[str, Any] | Config | None = None) -> Runtime:
    """Start a runtime from a sys.yaml path, a mapping, a `Config`, or defaults (None).

    Raises:
        ConfigError: the configuration is invalid (the error names the key).
        ModelLoadError: a model listed in the configuration cannot be loaded.
    """
    return Runtime(load_config(config))


class Runtime:
    """A running erllama-py: the supervision tree, the cache and the loaded models."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._tree: Tree = start_tree(config)
        self.cache = self._tree.cache
        self._stopped = False
        try:
            for settings in config.models:
                self._registry().load(settings).get(timeout=LOAD_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ models

    def _registry(self) -> Any:
        self._check_running()
        try:
            ref = self._tree.registry.wait_for(REGISTRY_NAME, ACTOR_WAIT_S)
        except NoProcError as exc:
            raise RuntimeStoppedError("the model registry is not running") from exc
        assert isinstance(ref, pykka.ActorRef)
        return ref.proxy()

    def load_model(
        self, name: str, model_path: str | Path | None = None, **options: Any
    ) -> dict[str, Any]:
        """Load a model under `name` and return its info.

        `model_path` is a GGUF file; or give ``model="gemma-3-270m"`` (a known
        model package), or ``backend="stub"``. Other options: ``n_ctx``,
        ``n_batch``, ``n_seq_max``, ``n_threads``, ``tier``, ``policy`` (save
        policy overrides), ``deterministic``, ``restart`` (``intensity``,
        ``period_s``), ``fingerprint`` (override the cache identity), ``stub``.

        Raises:
            ConfigError: an invalid option (the key names it).
            ModelAlreadyLoadedError: `name` is loaded.
            ModelLoadError: the file is missing, corrupt or unsupported (nothing is left running).
        """
        raw: dict[str, Any] = {"name": name, **options}
        if model_path is not None:
            raw["model_path"] = str(model_path)
        if "policy" in raw and raw["policy"] is not None:
            raw["policy"] = dict(raw["policy"])
        settings = parse_model(raw, f"load_model({name!r})", self.config.policy, self.config.cache)
        info: dict[str, Any] = self._registry().load(settings).get(timeout=LOAD_TIMEOUT_S)
        return info

    def unload(self, name: str) -> None:
        """Save what the model has in flight (reason ``shutdown``), stop its worker, forget it."""
        self._check_running()
        self._tree.models.get(name)
        self._registry().unload(name).get(timeout=LOAD_TIMEOUT_S)

    def models(self) -> list[dict[str, Any]]:
        """Every loaded (or failed) model's info."""
        return [self.model_info(name) for name in self._tree.models.names()]

    def model_info(self, name: str) -> dict[str, Any]:
        """A model's identity, settings, phase, queue and worker (pid, state, restarts)."""
        entry = self._tree.models.get(name)
        shared = entry.shared
        info = shared.info
        worker: dict[str, Any] = {"pid": None, "state": "down", "restarts": 0}
        sup = self._tree.registry.whereis(sup_name(name))
        if isinstance(sup, pykka.ActorRef):
            with contextlib.suppress(Exception):
                for child in which_children(sup, timeout=5.0):
                    if child.id == "worker":
                        worker = {
                            "pid": child.pid,
                            "state": child.state,
                            "restarts": child.restarts,
                        }
        obs = shared.obs
        return {
            "name": name,
            "status": entry.status,
            "phase": "failed" if entry.status == "failed" else obs.phase,
            "pending_len": obs.pending_len,
            "active": obs.active,
            "last_cache_hit": obs.last_cache_hit,
            "requests_done": obs.requests_done,
            "tokens_generated": obs.tokens_generated,
            "backend": info.backend,
            "path": info.path,
            "description": info.description,
            "quant": info.quant,
            "fingerprint": (shared.fingerprint or info.fingerprint).hex(),
            "n_vocab": info.n_vocab,
            "n_ctx": info.n_ctx,
            "n_batch": info.n_batch,
            "n_seq_max": info.n_seq_max,
            "n_swa": info.n_swa,
            "chat_template": info.chat_template is not None,
            "tier": shared.tier,
            "deterministic": shared.deterministic,
            "policy": dict(vars(shared.policy)),
            "worker": worker,
            "worker_starts": shared.worker_starts,
            "loaded_at": shared.loaded_at,
        }

    def phase(self, name: str) -> str:
        """``idle``, ``prefilling``, ``generating``, ``restarting`` or ``failed`` (lock-free)."""
        entry = self._tree.models.get(name)
        return "failed" if entry.status == "failed" else entry.shared.obs.phase

    def pending_len(self, name: str) -> int:
        """Requests waiting for a sequence (lock-free)."""
        return self._tree.models.get(name).shared.obs.pending_len

    def last_cache_hit(self, name: str) -> dict[str, Any] | None:
        """``{kind, prefix_len}`` of the last admission, or None before the first (lock-free)."""
        return self._tree.models.get(name).shared.obs.last_cache_hit

    # ------------------------------------------------------------------ requests

    def _actor(self, name: str) -> pykka.ActorRef[Any]:
        self._check_running()
        self._tree.models.live(name)
        try:
            ref = self._tree.registry.wait_for(actor_name(name), ACTOR_WAIT_S)
        except NoProcError:
            self._tree.models.live(name)  # raises ModelFailedError if it gave up meanwhile
            raise ModelFailedError(f"model {name!r} is not running", name) from None
        assert isinstance(ref, pykka.ActorRef)
        return ref

    def _ask(self, name: str, method: str, *args: Any) -> Any:
        try:
            return getattr(self._actor(name).proxy(), method)(*args).get(timeout=CALL_TIMEOUT_S)
        except pykka.ActorDeadError:
            raise ModelFailedError(f"model {name!r} stopped during the call", name) from None

    def _prompt(self, name: str, prompt: object) -> tuple[list[int], str | None]:
        self._check_running()
        info = self._tree.models.live(name).shared.info
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", name, param="prompt")
            return [], prompt
        if isinstance(prompt, list | tuple):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", name, param="prompt")
            for i, token in enumerate(prompt):
                if isinstance(token, bool) or not isinstance(token, int):
                    raise InvalidRequestError(
                        f"prompt[{i}] is not a token id: {token!r}", name, param="prompt"
                    )
                if not 0 <= token < info.n_vocab:
                    raise InvalidRequestError(
                        f"prompt[{i}] = {token} is outside the vocabulary [0, {info.n_vocab})",
                        name,
                        param="prompt",
                    )
            return list(prompt), None
        raise InvalidRequestError(
            f"prompt must be text or a list of token ids, got {type(prompt).__name__}",
            name,
            param="prompt",
        )

    def _submit(
        self,
        name: str,
        prompt: object,
        options: Mapping[str, Any],
        *,
        chat: Sequence[Mapping[str, Any]] | None = None,
        template: str | None = None,
        prefill_only: bool = False,
        stream: bool = False,
        sink: RequestSink | None = None,
    ) -> Request:
        self._check_running()
        opts = parse_options(options, model=name)
        tokens: list[int] = []
        text: str | None = None
        if chat is not None:
            _check_messages(name, chat)
        else:
            tokens, text = self._prompt(name, prompt)
        request = Request(
            prompt=tokens,
            options=opts,
            sink=sink or RequestSink(),
            prefill_only=prefill_only,
            stream=stream,
        )
        actor = self._actor(name)
        try:
            actor.tell(Submit(request, text=text, chat=chat, template=template))
        except pykka.ActorDeadError:
            raise ModelFailedError(f"model {name!r} is not running", name) from None
        return request

    def _cancel(self, name: str, request: Request) -> None:
        # A cancelled future (asyncio cancels the future it wraps) still needs the actor told.
        if request.sink.done and not request.sink.future.cancelled():
            return
        with contextlib.suppress(ErllamaError, pykka.ActorDeadError):
            self._actor(name).tell(Cancel(request.id))

    def _wait(self, name: str, request: Request) -> dict[str, Any]:
        try:
            while True:
                try:
                    return request.sink.future.result(timeout=0.5)
                except FutureTimeoutError:
                    self._check_running()
        except BaseException:
            self._cancel(name, request)
            raise

    def complete(self, name: str, prompt: str | Sequence[int], **options: Any) -> dict[str, Any]:
        """Complete a prompt (text, or token ids used as given: no BOS added).

        Options: ``max_tokens`` (default 128; None = up to the context), ``stop``,
        ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``,
        ``seed``, ``grammar`` (GBNF), ``json_schema``, ``parent_key``.

        Returns:
            ``text``, ``tokens``, ``finish_reason`` (stop, length, cancelled),
            ``finish_key``, ``usage`` (with ``cached_tokens``), ``cache``
            (``kind``: exact, parent, prefix or cold, and ``prefix_len``), ``timings``.

        Raises:
            ModelNotFoundError, ModelFailedError, InvalidRequestError,
            ContextOverflowError, WorkerCrashedError (the worker died under it).
        """
        return self._wait(name, self._submit(name, prompt, options))

    def chat(
        self,
        name: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        template: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Complete a conversation rendered with the model's chat template (or a named one)."""
        return self._wait(name, self._submit(name, None, options, chat=messages, template=template))

    def prefill(
        self, name: str, prompt: str | Sequence[int], parent_key: str | bytes | None = None
    ) -> dict[str, Any]:
        """Warm the cache with a prompt without sampling; returns its ``finish_key``."""
        options: dict[str, Any] = {} if parent_key is None else {"parent_key": parent_key}
        return self._wait(name, self._submit(name, prompt, options, prefill_only=True))

    def stream(self, name: str, prompt: str | Sequence[int], **options: Any) -> EventStream:
        """Stream a completion: ``delta`` events (whole UTF-8 characters), then one ``done``.

        Closing the iterator cancels the request (its sequence and pins are freed).
        """
        request = self._submit(name, prompt, options, stream=True)
        return self._events(name, request)

    def chat_stream(
        self,
        name: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        template: str | None = None,
        **options: Any,
    ) -> EventStream:
        """`stream` for a conversation."""
        request = self._submit(name, None, options, chat=messages, template=template, stream=True)
        return self._events(name, request)

    def _events(self, name: str, request: Request) -> EventStream:
        return EventStream(self, name, request)

    # ------------------------------------------------------------------ asyncio

    async def acomplete(
        self, name: str, prompt: str | Sequence[int], **options: Any
    ) -> dict[str, Any]:
        """`complete` for asyncio: the event loop is never blocked."""
        request = self._submit(name, prompt, options)
        return await self._await(name, request)

    async def achat(
        self,
        name: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        template: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """`chat` for asyncio."""
        request = self._submit(name, None, options, chat=messages, template=template)
        return await self._await(name, request)

    async def _await(self, name: str, request: Request) -> dict[str, Any]:
        try:
            return await asyncio.wrap_future(request.sink.future)
        except asyncio.CancelledError:
            self._cancel(name, request)
            raise

    async def astream(
        self, name: str, prompt: str | Sequence[int], **options: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """`stream` for asyncio; leaving the loop early cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def notify(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        sink = RequestSink(notify)
        request = self._submit(name, prompt, options, stream=True, sink=sink)
        try:
            while True:
                event = await queue.get()
                if event.type == "error":
                    assert event.error is not None
                    raise event.error
                yield event.to_dict()
                if event.type == "done":
                    return
        finally:
            self._cancel(name, request)

    # ------------------------------------------------------------------ tokens

    def tokenize(self, name: str, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text` (with BOS when the model wants one and `add_special`)."""
        if not isinstance(text, str):
            raise InvalidRequestError("text must be a string", name, param="text")
        result: list[int] = self._ask(name, "tokenize", text, add_special)
        return result

    def detokenize(self, name: str, tokens: Sequence[int]) -> str:
        """Text of token ids (invalid UTF-8 is replaced)."""
        checked, _ = self._prompt(name, list(tokens)) if tokens else ([], None)
        data: bytes = self._ask(name, "detokenize", checked)
        return data.decode("utf-8", errors="replace")

    def embed(self, name: str, inputs: str | Sequence[str]) -> list[list[float]]:
        """One embedding per input text."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise InvalidRequestError("inputs must be non-empty strings", name, param="inputs")
        out: list[list[float]] = []
        for text in texts:
            tokens: list[int] = self._ask(name, "tokenize", text, True)
            out.append(self._ask(name, "embed", tokens))
        return out

    def evict(self, name: str) -> int:
        """Save the state of every request in flight (reason ``evict``); returns how many."""
        fired: int = self._ask(name, "evict")
        return fired

    # ------------------------------------------------------------------ inspection

    def counters(self) -> dict[str, Any]:
        """Every cache counter and per-tier statistics."""
        return self.cache.counters().to_dict()

    def cache_rows(self) -> list[dict[str, Any]]:
        """Every cache row (and save in flight)."""
        return [row.to_dict() for row in self.cache.rows()]

    def tree(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the whole supervision tree."""
        self._check_running()
        snapshot: dict[str, Any] = dict(tree(self._tree.root))
        return snapshot

    @property
    def registry(self) -> Any:
        """The tree's name registry (for the REPL and tests)."""
        return self._tree.registry

    # ------------------------------------------------------------------ lifecycle

    def _check_running(self) -> None:
        if self._stopped:
            raise RuntimeStoppedError("the runtime has been stopped")

    def stop(self, timeout: float = 60.0) -> None:
        """Unload every model (``shutdown`` saves), let saves finish, stop the tree."""
        if self._stopped:
            return
        with contextlib.suppress(ErllamaError, pykka.ActorDeadError, pykka.Timeout):
            self._registry().unload_all().get(timeout=timeout)
        with contextlib.suppress(Exception):
            self.cache.wait_idle(timeout)
        self._stopped = True
        root = self._tree.root
        if root.is_alive():
            root.stop(block=True, timeout=timeout)
        self.cache.shared.stopped = True

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class EventStream(Iterator[dict[str, Any]]):
    """The events of a streamed request: ``delta`` events, then one ``done``.

    Closing it (``close()``, leaving a ``with`` block, or dropping the last
    reference) cancels the request, also before the first event was read.
    """

    def __init__(self, runtime: Runtime, name: str, request: Request) -> None:
        self._runtime = runtime
        self._name = name
        self._request = request
        self._finished = False

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._finished:
            raise StopIteration
        try:
            while True:
                try:
                    event = self._request.sink.events.get(timeout=0.5)
                except queue.Empty:
                    self._runtime._check_running()
                    continue
                if event.type == "error":
                    assert event.error is not None
                    raise event.error
                if event.type == "done":
                    self._finished = True
                return event.to_dict()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancel the request if it is still running (idempotent)."""
        self._finished = True
        self._runtime._cancel(self._name, self._request)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._finished:
            with contextlib.suppress(Exception):
                self.close()


def _check_messages(name: str, messages: object) -> None:
    if not isinstance(messages, list | tuple) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", name, param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object", name, param="messages")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(
                f"messages[{i}].role must be a string", name, param="messages"
            )
        if not isinstance(content, str):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string", name, param="messages"
            )
