"""A loaded model's supervision subtree, and ``model_sup`` above all of them.

::

    model_sup                 simple_one_for_one, one temporary child per model
    └── model:<name>          one_for_one, the model's own restart intensity
        ├── worker            the context worker process (model:<name>/worker)
        └── actor             the model actor (model:<name>/actor)

The worker starts first: its start function spawns the process and waits
for the model to load, so a model that cannot load fails ``load_model`` and
leaves nothing running. A dead worker is restarted by ``model:<name>``; when
that happens more often than the model's restart intensity allows, the
subtree gives up and, being temporary, stays down: the model is reported
failed until it is unloaded and loaded again.
"""

from __future__ import annotations

from typing import Any

import pykka

from erllama_py.config import RestartSettings
from erllama_py.errors import ModelLoadError
from erllama_py.model.actor import ModelActor
from erllama_py.model.client import start_worker
from erllama_py.model.state import ModelState, actor_name, sup_name, worker_name
from supervisors import ChildSpec, ProcessChild, Registry, Supervisor

__all__ = ["MODEL_SUP_NAME", "model_sup_spec", "start_model"]

MODEL_SUP_NAME = "model_sup"
WORKER_SHUTDOWN_S = 5.0


def _start_worker(shared: ModelState) -> ProcessChild:
    process, info = start_worker(shared.spec)
    if shared._info is not None and info.fingerprint != shared.info.fingerprint:
        process.kill()
        raise ModelLoadError(
            f"the model file of {shared.name!r} changed since it was loaded; unload and load it",
            shared.name,
        )
    shared.worker_loaded(info)
    return process


def start_model(shared: ModelState, restart: RestartSettings) -> pykka.ActorRef[Any]:
    """Start ``model:<name>``: its worker (the model loads) then its actor.

    Raises:
        ModelLoadError: the worker could not load the model.
    """
    return Supervisor.start(
        sup_name(shared.name),
        strategy="one_for_one",
        intensity=restart.intensity,
        period=restart.period_s,
        children=[
            ChildSpec(
                id="worker",
                start=lambda: _start_worker(shared),
                name=worker_name(shared.name),
                shutdown=WORKER_SHUTDOWN_S,
            ),
            ChildSpec(
                id="actor",
                start=lambda: ModelActor.start(shared),
                name=actor_name(shared.name),
            ),
        ],
        registry=shared.registry,
    )


def model_sup_spec(registry: Registry, intensity: int, period: float) -> ChildSpec:
    """``model_sup``: its children are started with ``start_child(shared, restart)``."""
    template = ChildSpec(id="model", start=start_model, kind="supervisor", restart="temporary")
    return ChildSpec(
        id=MODEL_SUP_NAME,
        start=lambda: Supervisor.start(
            MODEL_SUP_NAME,
            strategy="simple_one_for_one",
            intensity=intensity,
            period=period,
            children=[template],
            registry=registry,
        ),
        kind="supervisor",
    )
