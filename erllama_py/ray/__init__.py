"""erllama-py on Ray Serve (the optional ``ray`` extra: ``pip install 'erllama-py[ray]'``).

Replicas each run a whole runtime (its supervision tree, context workers and cache
tiers on its node) behind the OpenAI app of ``erllama-py serve``; Serve's request
router extension point (`CacheAffinityRouter`) sends each request to the replica
most likely to hold its longest cached prefix. The core never imports this package.
"""

from erllama_py.ray.deploy import RayServing as RayServing
from erllama_py.ray.deploy import build_app as build_app
from erllama_py.ray.deploy import serve_on_ray as serve_on_ray
from erllama_py.ray.router import CacheAffinityRouter as CacheAffinityRouter

__all__ = ["CacheAffinityRouter", "RayServing", "build_app", "serve_on_ray"]
