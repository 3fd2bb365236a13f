"""``cache_sup``: the cache's supervision subtree.

::

    cache_sup                 one_for_one
    ├── cache_meta            sole writer of the index (scans the tiers when it starts)
    ├── cache_ram             RAM tier (if configured)
    ├── cache_ramfile:<root>  one per ram_file root
    ├── cache_disk:<root>     one per disk root
    └── cache_writers         one_for_one pool of cache_writer:<i>

The meta actor starts first, so the tiers it scanned are indexed before any
writer runs. Its configuration is validated before anything starts: a tier
root that cannot be created fails start-up with the key that names it.
"""

from __future__ import annotations

from typing import Any

import pykka

from erllama_py.cache.meta import MetaActor
from erllama_py.cache.state import (
    META_NAME,
    RAM_NAME,
    WRITER_NAME,
    WRITERS_NAME,
    CacheState,
    tier_actor_name,
)
from erllama_py.cache.tiers import FileTierActor, RamTierActor
from erllama_py.cache.writer_pool import WriterActor
from erllama_py.config import check_tier_roots
from supervisors import ChildSpec, Supervisor

__all__ = ["CACHE_SUP_NAME", "cache_sup_spec", "start_cache_sup"]

CACHE_SUP_NAME = "cache_sup"


def _writers_sup(shared: CacheState) -> pykka.ActorRef[Any]:
    restart = shared.settings.restart
    return Supervisor.start(
        WRITERS_NAME,
        strategy="one_for_one",
        intensity=restart.intensity,
        period=restart.period_s,
        children=[
            ChildSpec(
                id=WRITER_NAME.format(i),
                start=lambda i=i: WriterActor.start(shared, i),
                name=WRITER_NAME.format(i),
            )
            for i in range(shared.settings.writers)
        ],
        registry=shared.registry,
    )


def start_cache_sup(shared: CacheState) -> pykka.ActorRef[Any]:
    """Validate the cache settings that touch the machine, then start the subtree.

    Raises:
        ConfigError: a tier root cannot be created or written, or another runtime
            holds it (`RootLocks`).
    """
    settings = shared.settings
    check_tier_roots(settings)
    shared.roots.acquire(settings)
    children = [
        ChildSpec(id=META_NAME, start=lambda: MetaActor.start(shared), name=META_NAME),
    ]
    for tier in settings.tiers:
        if tier.kind == "ram":
            children.append(
                ChildSpec(id=RAM_NAME, start=lambda: RamTierActor.start(shared), name=RAM_NAME)
            )
            continue
        name = tier_actor_name(tier.kind, tier.root)
        store = shared.files[tier.name]
        children.append(
            ChildSpec(
                id=name,
                start=lambda store=store: FileTierActor.start(shared, store),
                name=name,
            )
        )
    children.append(
        ChildSpec(
            id=WRITERS_NAME,
            start=lambda: _writers_sup(shared),
            kind="supervisor",
        )
    )
    return Supervisor.start(
        CACHE_SUP_NAME,
        strategy="one_for_one",
        intensity=settings.restart.intensity,
        period=settings.restart.period_s,
        children=children,
        registry=shared.registry,
    )


def cache_sup_spec(shared: CacheState) -> ChildSpec:
    """The child spec that puts ``cache_sup`` under the root supervisor."""
    return ChildSpec(
        id=CACHE_SUP_NAME,
        start=lambda: start_cache_sup(shared),
        kind="supervisor",
    )
