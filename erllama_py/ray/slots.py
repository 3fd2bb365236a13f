"""Node-local cache roots for a replica: ``{node}`` in a root, plus a slot it locks.

Replicas on one node must not share a tier root, and a replica that Serve restarts
should find the rows its predecessor saved. Each replica takes the lowest free slot
of its node (an exclusive ``flock`` on ``slot-N.lock``, released by the kernel when
the process dies, however it dies) and puts its file tiers under
``<root with {node} expanded>/slot-N``: the restart of a killed replica takes the
slot it freed, so the same prompts hit its disk rows again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tempfile
from pathlib import Path

from erllama_py.config import Config, TierSettings
from erllama_py.errors import ConfigError

__all__ = ["MAX_SLOTS", "Slot", "claim_slot", "node_local_config"]

MAX_SLOTS = 256


@dataclasses.dataclass
class Slot:
    """A claimed slot; the lock lasts as long as `fd` is open (the process, normally)."""

    number: int
    fd: int

    def release(self) -> None:
        os.close(self.fd)


def claim_slot(node_id: str, lock_dir: Path | None = None) -> Slot:
    """The lowest free slot of this node.

    Raises:
        ConfigError: all `MAX_SLOTS` slots are taken.
    """
    base = (lock_dir or Path(tempfile.gettempdir()) / "erllama-py-ray") / node_id
    base.mkdir(parents=True, exist_ok=True)
    for number in range(MAX_SLOTS):
        fd = os.open(base / f"slot-{number}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return Slot(number, fd)
    raise ConfigError("ray.replicas", f"more than {MAX_SLOTS} replicas on node {node_id}")


def node_local_config(config: Config, node_id: str, slot: int) -> Config:
    """`config` with every file tier's root made this node's and this slot's."""

    def local(tier: TierSettings) -> TierSettings:
        if tier.root is None:
            return tier
        root = Path(str(tier.root).replace("{node}", node_id)) / f"slot-{slot}"
        return dataclasses.replace(tier, root=root)

    cache = dataclasses.replace(config.cache, tiers=tuple(local(t) for t in config.cache.tiers))
    return dataclasses.replace(config, cache=cache)
