"""The public runtime: load models, get their handles, inspect, stop.

`erllama_py.start(config)` returns a `Runtime`; ``rt.model(name)`` returns a
`ModelHandle` with every per-model call (blocking and asyncio). The name-first
calls on the runtime (``rt.complete("m", prompt)``) are thin forwarders to the
handle, kept so that code written against them keeps working. Every result is
a frozen, typed object with ``to_dict()``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Unpack

import pykka

from erllama_py.app import REGISTRY_NAME, Tree, start_tree
from erllama_py.cache.counters import CounterSnapshot
from erllama_py.cache.handle import CacheHandle
from erllama_py.cache.rows import RowInfo
from erllama_py.config import Config, load_config, parse_model
from erllama_py.errors import ErllamaError, RuntimeStoppedError
from erllama_py.kinds import Phase
from erllama_py.model.registry import ModelRegistry
from erllama_py.model_handle import ModelHandle, RuntimeCore
from erllama_py.params import ChatMessage, CompletionOptions, ModelOptions, Tool
from erllama_py.results import CacheHit, Completion, ModelInfo
from erllama_py.streams import AsyncEventStream, EventStream
from supervisors import (
    ChildSpec,
    NoProcError,
    Registry,
    TreeNode,
    delete_child,
    start_child,
    terminate_child,
    tree,
)

__all__ = ["Runtime", "astart", "start"]

ACTOR_WAIT_S = 30.0  # a restarting registry is waited for this long
LOAD_TIMEOUT_S = 600.0

ConfigSource = str | Path | Mapping[str, object] | Config | None
"""A sys.yaml path, a mapping (sys.yaml's structure), a `Config`, or None for defaults."""


def start(config: ConfigSource = None, *, load_models: bool = True) -> Runtime:
    """Start a runtime from a sys.yaml path, a mapping, a `Config`, or defaults (None).

    With ``load_models=False`` the models of the configuration are not loaded yet
    (call `Runtime.load_configured_models`): a server answers ``/health`` meanwhile.

    Raises:
        ConfigError: the configuration is invalid (the error names the key).
        ModelLoadError: a model listed in the configuration cannot be loaded.
    """
    return Runtime(load_config(config), load_models=load_models)


async def astart(config: ConfigSource = None) -> Runtime:
    """`start` for asyncio (models load without blocking the event loop)."""
    return await asyncio.to_thread(start, config)


class Runtime:
    """A running erllama-py: the supervision tree, the cache and the loaded models.

    Use it as a context manager (``with`` or ``async with``), or call `stop`.
    """

    def __init__(self, config: Config, *, load_models: bool = True) -> None:
        self.config = config
        self._tree: Tree = start_tree(config)
        self.cache: CacheHandle = self._tree.cache
        self._stopped = False
        self._core = RuntimeCore(self._tree, self._check_running)
        if load_models:
            try:
                self.load_configured_models()
            except BaseException:
                self.stop()
                raise

    def load_configured_models(self) -> None:
        """Load every model of the configuration that is not loaded yet, in order.

        Raises:
            ModelLoadError: a model cannot be loaded (those before it stay loaded).
        """
        for settings in self.config.models:
            if settings.name not in self._tree.models:
                self._registry().load(settings).get(timeout=LOAD_TIMEOUT_S)

    # ------------------------------------------------------------------ models

    def _registry(self) -> pykka.ActorProxy[ModelRegistry]:
        self._check_running()
        try:
            ref = self._tree.registry.wait_for(REGISTRY_NAME, ACTOR_WAIT_S)
        except NoProcError as exc:
            raise RuntimeStoppedError("the model registry is not running") from exc
        assert isinstance(ref, pykka.ActorRef)
        proxy: pykka.ActorProxy[ModelRegistry] = ref.proxy()
        return proxy

    def model(self, name: str) -> ModelHandle:
        """The handle of a loaded model.

        Raises:
            ModelNotFoundError: no model is loaded under `name`.
        """
        self._check_running()
        self._tree.models.get(name)
        return ModelHandle(self._core, name)

    def load_model(
        self, name: str, model_path: str | Path | None = None, **options: Unpack[ModelOptions]
    ) -> ModelHandle:
        """Load a model under `name` and return its handle.

        `model_path` is a GGUF file; or give ``model="gemma-3-270m"`` (a known
        model package), or ``backend="stub"``. See `ModelOptions` for the rest.

        Raises:
            ConfigError: an invalid option (the key names it).
            ModelAlreadyLoadedError: `name` is loaded.
            ModelLoadError: the file is missing, corrupt or unsupported (nothing is left running).
        """
        raw: dict[str, object] = {"name": name, **options}
        if model_path is not None:
            raw["model_path"] = str(model_path)
        policy = raw.get("policy")
        if isinstance(policy, Mapping):
            raw["policy"] = dict(policy)
        settings = parse_model(raw, f"load_model({name!r})", self.config.policy, self.config.cache)
        self._registry().load(settings).get(timeout=LOAD_TIMEOUT_S)
        return ModelHandle(self._core, name)

    def unload(self, name: str) -> None:
        """Save what the model has in flight (reason ``shutdown``), stop its worker, forget it."""
        self._check_running()
        self._tree.models.get(name)
        self._registry().unload(name).get(timeout=LOAD_TIMEOUT_S)

    def models(self) -> list[ModelInfo]:
        """Every loaded (or failed) model's info."""
        return [self.model(name).info() for name in self._tree.models.names()]

    def model_info(self, name: str) -> ModelInfo:
        """A model's identity, settings, phase, queue and worker (``rt.model(name).info()``)."""
        return self.model(name).info()

    def phase(self, name: str) -> Phase:
        """``rt.model(name).phase()``."""
        return self.model(name).phase()

    def pending_len(self, name: str) -> int:
        """``rt.model(name).pending_len()``."""
        return self.model(name).pending_len()

    def last_cache_hit(self, name: str) -> CacheHit | None:
        """``rt.model(name).last_hit()``."""
        return self.model(name).last_hit()

    # ------------------------------------------------------------------ name-first forwarders

    def complete(
        self, name: str, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> Completion:
        """``rt.model(name).complete(prompt, ...)``."""
        return self.model(name).complete(prompt, **options)

    def chat(
        self,
        name: str,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
        **options: Unpack[CompletionOptions],
    ) -> Completion:
        """``rt.model(name).chat(messages, ...)``."""
        return self.model(name).chat(messages, template=template, tools=tools, **options)

    def prefill(
        self, name: str, prompt: str | Sequence[int], parent_key: str | bytes | None = None
    ) -> Completion:
        """``rt.model(name).prefill(prompt, ...)``."""
        return self.model(name).prefill(prompt, parent_key=parent_key)

    def stream(
        self, name: str, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> EventStream:
        """``rt.model(name).stream(prompt, ...)``."""
        return self.model(name).stream(prompt, **options)

    def chat_stream(
        self,
        name: str,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
        **options: Unpack[CompletionOptions],
    ) -> EventStream:
        """``rt.model(name).chat_stream(messages, ...)``."""
        return self.model(name).chat_stream(messages, template=template, tools=tools, **options)

    async def acomplete(
        self, name: str, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> Completion:
        """``await rt.model(name).acomplete(prompt, ...)``."""
        return await self.model(name).acomplete(prompt, **options)

    async def achat(
        self,
        name: str,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
        **options: Unpack[CompletionOptions],
    ) -> Completion:
        """``await rt.model(name).achat(messages, ...)``."""
        return await self.model(name).achat(messages, template=template, tools=tools, **options)

    def astream(
        self, name: str, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> AsyncEventStream:
        """``rt.model(name).astream(prompt, ...)``."""
        return self.model(name).astream(prompt, **options)

    def achat_stream(
        self,
        name: str,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
        **options: Unpack[CompletionOptions],
    ) -> AsyncEventStream:
        """``rt.model(name).achat_stream(messages, ...)``."""
        return self.model(name).achat_stream(messages, template=template, tools=tools, **options)

    def tokenize(self, name: str, text: str, add_special: bool = True) -> list[int]:
        """``rt.model(name).tokenize(text)``."""
        return self.model(name).tokenize(text, add_special)

    def detokenize(self, name: str, tokens: Sequence[int]) -> str:
        """``rt.model(name).detokenize(tokens)``."""
        return self.model(name).detokenize(tokens)

    def embed(self, name: str, inputs: str | Sequence[str]) -> list[list[float]]:
        """``rt.model(name).embed(inputs)``."""
        return self.model(name).embed(inputs)

    def evict(self, name: str) -> int:
        """``rt.model(name).evict()``."""
        return self.model(name).evict()

    # ------------------------------------------------------------------ inspection

    def counters(self) -> CounterSnapshot:
        """Every cache counter and per-tier statistics (no mailbox)."""
        return self.cache.counters()

    def cache_rows(self) -> list[RowInfo]:
        """Every cache row (and save in flight)."""
        return self.cache.rows()

    def tree(self) -> TreeNode:
        """A JSON-serialisable snapshot of the whole supervision tree."""
        self._check_running()
        return tree(self._tree.root)

    def attach(self, spec: ChildSpec) -> None:
        """Start a child (a service of the application, such as the HTTP server) under the
        runtime's root supervisor: it is restarted like the runtime's own children, shows
        in `tree`, and stops with the runtime.

        Raises:
            whatever the child's start raised (the child is not added).
        """
        self._check_running()
        start_child(self._tree.root, spec)

    def detach(self, child_id: str, timeout: float = 30.0) -> None:
        """Stop and remove a child added with `attach` (its own shutdown runs)."""
        self._check_running()
        terminate_child(self._tree.root, child_id, timeout=timeout)
        delete_child(self._tree.root, child_id, timeout=timeout)

    @property
    def registry(self) -> Registry:
        """The tree's name registry (for the REPL and tests)."""
        return self._tree.registry

    # ------------------------------------------------------------------ lifecycle

    @property
    def stopped(self) -> bool:
        return self._stopped

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
        self.cache.mark_stopped()

    async def astop(self, timeout: float = 60.0) -> None:
        """`stop` for asyncio."""
        await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.astop()
