"""The model registry: model name -> loaded model, with one writer.

`ModelTable` is read by anyone without a mailbox (lookups on every request).
`ModelRegistry`, an actor under the root supervisor, is its only writer: it
serialises loads and unloads, so two ``load_model`` calls with one name
cannot race, and an unload never overlaps a load of the same model.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import pykka

from erllama_py.cache.handle import CacheHandle
from erllama_py.config import Config, ModelSettings
from erllama_py.errors import (
    ModelAlreadyLoadedError,
    ModelFailedError,
    ModelLoadError,
    ModelNotFoundError,
)
from erllama_py.model.arena import Arena
from erllama_py.model.backend import BackendInfo
from erllama_py.model.catalog import resolve_model
from erllama_py.model.deadline import WorkerDeadline
from erllama_py.model.protocol import WorkerSpec
from erllama_py.model.state import ModelState, actor_name
from erllama_py.model.tree import MODEL_SUP_NAME
from erllama_py.results import ModelStatus
from supervisors import Registry, SupervisedActor, start_child, terminate_child

__all__ = ["ModelEntry", "ModelRegistry", "ModelTable"]

log = logging.getLogger("erllama_py.model")
UNLOAD_TIMEOUT_S = 30.0


@dataclass
class ModelEntry:
    """A loaded (or failed) model."""

    settings: ModelSettings
    shared: ModelState
    sup: pykka.ActorRef[Any]

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def status(self) -> ModelStatus:
        """``loaded``, ``unloading`` or ``failed`` (its restart intensity ran out)."""
        if self.shared.unloading:
            return "unloading"
        return "loaded" if self.sup.is_alive() else "failed"


@dataclass
class ModelTable:
    """Thread-safe name -> `ModelEntry` map (written by the `ModelRegistry` actor only)."""

    _entries: dict[str, ModelEntry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, name: str) -> ModelEntry:
        """The entry of a model.

        Raises:
            ModelNotFoundError: no such model.
        """
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(name)
        return entry

    def live(self, name: str) -> ModelEntry:
        """The entry of a model that can serve requests.

        Raises:
            ModelNotFoundError, ModelFailedError.
        """
        entry = self.get(name)
        if entry.status == "failed":
            raise ModelFailedError(
                f"model {name!r} failed: its worker kept crashing (restart intensity "
                f"{entry.settings.restart.intensity} in {entry.settings.restart.period_s:g} s "
                "exceeded); unload and load it again",
                name,
            )
        return entry

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return [self._entries[n] for n in sorted(self._entries)]

    def put(self, entry: ModelEntry) -> None:
        with self._lock:
            self._entries[entry.name] = entry

    def remove(self, name: str) -> ModelEntry | None:
        with self._lock:
            return self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries


def worker_spec(settings: ModelSettings, config: Config) -> WorkerSpec:
    """The worker spec of a model: its file resolved, its log next to the daemon's.

    Raises:
        ModelLoadError: an unknown model name or a missing file.
    """
    path: str | None = None
    if settings.backend == "llama":
        if settings.model_path is not None:
            path = str(settings.model_path)
        else:
            assert settings.model is not None
            path = str(resolve_model(settings.model))
    log_dir = config.daemon.log_file.parent / "workers"
    return WorkerSpec(
        model=settings.name,
        backend=settings.backend,
        model_path=path,
        n_ctx=settings.n_ctx,
        n_batch=settings.n_batch,
        n_seq_max=settings.n_seq_max,
        n_threads=settings.n_threads,
        log_path=str(log_dir / f"{settings.name}.log"),
        stub=dict(settings.stub),
    )


class ModelRegistry(SupervisedActor):
    """Loads and unloads models one at a time (see the module docstring)."""

    def __init__(
        self,
        table: ModelTable,
        config: Config,
        cache: CacheHandle,
        registry: Registry,
        arena: Arena,
    ) -> None:
        super().__init__()
        self.table = table
        self.config = config
        self.cache = cache
        self.registry = registry
        self.arena = arena

    def load(self, settings: ModelSettings) -> BackendInfo:
        """Start a model's subtree (its worker loads the model); returns what it loaded.

        Raises:
            ModelAlreadyLoadedError, ModelLoadError, ConfigError.
        """
        if settings.name in self.table:
            if self.table.get(settings.name).status != "failed":
                raise ModelAlreadyLoadedError(settings.name)
            self._stop_model(self.table.get(settings.name))
        spec = worker_spec(settings, self.config)
        shared = ModelState(
            name=settings.name,
            spec=spec,
            policy=settings.policy,
            tier=settings.tier,
            deterministic=settings.deterministic,
            cache=self.cache,
            registry=self.registry,
            fingerprint=settings.fingerprint,
            max_queue=settings.max_queue,
            arena=self.arena,
            deadline=WorkerDeadline(settings.deadline_floor_s, settings.deadline_factor),
        )
        model_sup = self.registry.lookup(MODEL_SUP_NAME)
        assert isinstance(model_sup, pykka.ActorRef)
        try:
            sup = start_child(model_sup, shared, settings.restart)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"cannot start model {settings.name!r}: {exc}", settings.name
            ) from exc
        assert isinstance(sup, pykka.ActorRef)
        self.table.put(ModelEntry(settings, shared, sup))
        return shared.info

    def unload(self, name: str) -> None:
        """Save what the model has in flight (reason ``shutdown``), then stop it.

        Raises:
            ModelNotFoundError.
        """
        entry = self.table.get(name)
        actor = self.registry.whereis(actor_name(name))
        if isinstance(actor, pykka.ActorRef):
            with contextlib.suppress(Exception):
                actor.proxy().shutdown().get(timeout=UNLOAD_TIMEOUT_S)
        self._stop_model(entry)

    def unload_all(self) -> None:
        for name in self.table.names():
            self.unload(name)

    def _stop_model(self, entry: ModelEntry) -> None:
        entry.shared.unloading = True
        model_sup = self.registry.whereis(MODEL_SUP_NAME)
        if isinstance(model_sup, pykka.ActorRef) and entry.sup.is_alive():
            try:
                terminate_child(model_sup, entry.sup)
            except Exception as exc:
                log.warning("unload of %s: %s", entry.name, exc)
        if entry.sup.is_alive():
            entry.sup.stop(block=True, timeout=UNLOAD_TIMEOUT_S)
        entry.shared.buffers.clear()
        self.table.remove(entry.name)
