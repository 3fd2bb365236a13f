"""Builds and starts the root supervision tree from a configuration.

::

    erllama_sup          one_for_one (restart intensity from sys.yaml)
    ├── cache_sup        the KV cache (meta actor, tiers, writer pool)
    ├── model_sup        simple_one_for_one: model:<name> per loaded model
    ├── model_registry   model name -> model; serialises loads and unloads
    └── pressure         memory-pressure poller (only when enabled)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pykka

from erllama_py.cache.handle import CacheHandle
from erllama_py.cache.state import CacheState
from erllama_py.cache.tree import cache_sup_spec
from erllama_py.config import Config, TierKind
from erllama_py.model.arena import Arena, segments_for
from erllama_py.model.registry import ModelRegistry, ModelTable
from erllama_py.model.tree import model_sup_spec
from erllama_py.pressure import PRESSURE_NAME, PressureActor
from supervisors import ChildSpec, Registry, Supervisor

__all__ = ["ROOT_NAME", "REGISTRY_NAME", "Tree", "start_tree"]

ROOT_NAME = "erllama_sup"
REGISTRY_NAME = "model_registry"


@dataclass(frozen=True)
class Tree:
    """The running tree and the handles the runtime needs."""

    root: pykka.ActorRef[Any]
    registry: Registry
    cache: CacheHandle
    models: ModelTable
    arena: Arena  # shared memory of packed states and RAM rows (closed by rt.stop)


def start_tree(config: Config) -> Tree:
    """Start the whole tree; returns once every child is up.

    Raises:
        ConfigError: a setting that touches the machine is invalid (a tier root).
        Exception: whatever a child's start raised (nothing is left running).
    """
    registry = Registry()
    cache_shared = CacheState(settings=config.cache, registry=registry)
    cache = CacheHandle(cache_shared)
    table = ModelTable()
    ram_quota = sum(t.quota_bytes for t in config.cache.tiers if t.kind is TierKind.RAM)
    arena = Arena(max_segments=segments_for(ram_quota))
    restart = config.restart
    children = [
        cache_sup_spec(cache_shared),
        model_sup_spec(registry, restart.intensity, restart.period_s),
        ChildSpec(
            id=REGISTRY_NAME,
            start=lambda: ModelRegistry.start(table, config, cache, registry, arena),
            name=REGISTRY_NAME,
        ),
    ]
    if config.pressure.enabled:
        children.append(
            ChildSpec(
                id=PRESSURE_NAME,
                start=lambda: PressureActor.start(config.pressure, cache),
                name=PRESSURE_NAME,
            )
        )
    try:
        root = Supervisor.start(
            ROOT_NAME,
            strategy="one_for_one",
            intensity=restart.intensity,
            period=restart.period_s,
            children=children,
            registry=registry,
        )
    except BaseException:
        cache_shared.roots.release()
        raise
    cache_shared.index()
    return Tree(root=root, registry=registry, cache=cache, models=table, arena=arena)
