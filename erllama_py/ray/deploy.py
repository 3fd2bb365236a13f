"""Build and run erllama-py on Ray Serve: ``erllama-py serve --ray`` or from Python.

::

    from erllama_py.config import load_config
    from erllama_py.ray import serve_on_ray

    serving = serve_on_ray(load_config("sys.yaml"), address="auto", replicas=3)
    print(serving.url)          # the OpenAI API at {url}/v1, /ray/status, /metrics
    serving.stop()

The application is two deployments: `ErllamaIngress` (Serve's FastAPI ingress, no
model, computes each request's affinity key) and `ErllamaReplica` (``ray.replicas``
replicas, each a whole runtime with node-local tiers), whose deployment handle routes
with `CacheAffinityRouter` (``ray.router: affinity``) or Ray's default
power-of-two-choices router (``ray.router: default``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from erllama_py.config import Config, RaySettings
from erllama_py.ray.ingress import ErllamaIngress
from erllama_py.ray.replica import ErllamaReplica

__all__ = ["INGRESS_NAME", "REPLICA_NAME", "RayServing", "build_app", "serve_on_ray"]

REPLICA_NAME = "ErllamaReplica"
INGRESS_NAME = "ErllamaIngress"
ROUTER_PATH = "erllama_py.ray.router:CacheAffinityRouter"
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 30.0


def _settings(config: Config, **overrides: Any) -> RaySettings:
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config.ray, **given)


def build_app(
    config: Config, *, replicas: int | None = None, router: str | None = None
) -> Application:
    """The Serve application for `config` (``ray:`` settings, optionally overridden)."""
    s = _settings(config, replicas=replicas, router=router)
    options: dict[str, Any] = {
        "name": REPLICA_NAME,
        "num_replicas": s.replicas,
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {
            "num_cpus": s.num_cpus_per_replica,
            "resources": dict(s.resources_per_replica),
        },
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": config.server.shutdown_timeout_s,
    }
    if s.router == "affinity":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_PATH,  # type: ignore[arg-type]  # pydantic field
            request_router_kwargs={"imbalance_threshold": s.imbalance_threshold},
        )
    replica = serve.deployment(**options)(ErllamaReplica)
    ingress = serve.deployment(
        name=INGRESS_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
    )(ErllamaIngress)  # fmt: skip
    app: Application = ingress.bind(replica.bind(config), s)
    return app


@dataclasses.dataclass
class RayServing:
    """erllama-py running on Ray Serve; `stop` deletes the application."""

    url: str
    app_name: str
    started_ray: bool

    def stop(self) -> None:
        serve.delete(self.app_name)
        if self.started_ray:
            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()


def serve_on_ray(
    config: Config, *, address: str | None = None, replicas: int | None = None,
    router: str | None = None, host: str | None = None, port: int | None = None,
) -> RayServing:  # fmt: skip
    """Deploy erllama-py on Ray Serve and wait until every replica serves.

    ``address`` (default ``ray.address``) is a running cluster (``"auto"``), or None to
    start a local Ray. The Serve HTTP proxy listens on ``host``/``port`` (default
    ``server.host``/``server.port``).
    """
    s = _settings(config, address=address)
    started = not ray.is_initialized()
    if started:
        ray.init(address=s.address, include_dashboard=False)
    host = host or config.server.host
    port = port or config.server.port
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    serve.run(build_app(config, replicas=replicas, router=router), name=s.app_name,
              route_prefix="/")  # fmt: skip
    return RayServing(f"http://{host}:{port}", s.app_name, started)
