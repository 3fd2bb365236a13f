"""The token-exact, tiered KV cache (the original's ``erllama_cache``).

Start one on its own with `start` (the runtime starts its own under the root
supervisor) and use the returned `CacheHandle`::

    cache = erllama_py.cache.start({"tiers": [{"kind": "ram", "quota_mb": 256}]})
    ns = Namespace(fingerprint=..., quant="q4_k_m", ctx_hash=ctx_params_hash(n_ctx=4096))
    key = cache.save(ns, tokens, payload, reason="cold")
    claim = cache.claim(key)
    payload = cache.load(claim)
    cache.checkin(claim)
    cache.stop()
"""

from __future__ import annotations

from collections.abc import Mapping

from erllama_py.cache.counters import CounterSnapshot as CounterSnapshot
from erllama_py.cache.counters import TierStats as TierStats
from erllama_py.cache.handle import CacheHandle as CacheHandle
from erllama_py.cache.handle import SaveTicket as SaveTicket
from erllama_py.cache.key import Namespace as Namespace
from erllama_py.cache.key import ctx_params_hash as ctx_params_hash
from erllama_py.cache.key import key_hex as key_hex
from erllama_py.cache.publish import SaveResult as SaveResult
from erllama_py.cache.rows import Claim as Claim
from erllama_py.cache.rows import PrefixHit as PrefixHit
from erllama_py.cache.rows import RowInfo as RowInfo
from erllama_py.cache.state import CacheState
from erllama_py.cache.tree import start_cache_sup
from erllama_py.config import CacheSettings, Config, load_config
from supervisors import Registry

__all__ = [
    "CacheHandle",
    "Claim",
    "CounterSnapshot",
    "Namespace",
    "PrefixHit",
    "RowInfo",
    "SaveResult",
    "SaveTicket",
    "TierStats",
    "ctx_params_hash",
    "key_hex",
    "start",
]


def start(config: CacheSettings | Config | Mapping[str, object] | None = None) -> CacheHandle:
    """Start a cache on its own supervision subtree.

    `config` is a `CacheSettings`, a whole `Config`, the ``cache:`` mapping of
    sys.yaml, or None (defaults: a RAM tier and a disk tier under the user's
    cache folder).

    Raises:
        ConfigError: invalid settings, or a tier root that cannot be created.
    """
    if isinstance(config, CacheSettings):
        settings = config
    elif isinstance(config, Config):
        settings = config.cache
    else:
        settings = load_config({"cache": dict(config or {})}).cache
    shared = CacheState(settings=settings, registry=Registry())
    try:
        sup = start_cache_sup(shared)
    except BaseException:
        shared.roots.release()
        raise
    shared.index()
    return CacheHandle(shared, sup)
