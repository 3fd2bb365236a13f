"""Fixtures for the HTTP server suite: one live server per test module, on a free port.

The server is the real one (`start_serving`: uvicorn under the runtime's root
supervisor) in this process, so a test can drive it with the official clients
over loopback and look at the runtime behind it. Its models:

- ``tiny``: the tiny random-weight llama GGUF on real llama.cpp (n_ctx 512);
- ``stub``: the deterministic stub backend (fast);
- ``slow``: the stub with a delay per step, one sequence and a queue of two, for
  cancellation, back-pressure and timeout tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from server_helpers import server_config

from erllama_py.config import load_config
from erllama_py.model.testmodel import write_test_model
from erllama_py.runtime import Runtime
from erllama_py.server.serve import Serving, start_serving


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Serving]:
    """A live server for the whole module, stopped after it."""
    root = tmp_path_factory.mktemp("server")
    s = start_serving(load_config(server_config(root, tiny_model_path)))
    yield s
    s.stop()


@pytest.fixture
def rt(serving: Serving) -> Runtime:
    return serving.runtime


@pytest.fixture
def url(serving: Serving) -> str:
    return serving.url


@pytest.fixture
def client(serving: Serving) -> Iterator[openai.OpenAI]:
    """The official client, without retries (a test sees every status it causes)."""
    c = openai.OpenAI(base_url=f"{serving.url}/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


@pytest.fixture
def http(serving: Serving) -> Iterator[httpx.Client]:
    """A raw HTTP client, for what the official one hides (headers, malformed bodies)."""
    with httpx.Client(base_url=serving.url, timeout=60.0) as c:
        yield c


@pytest.fixture
def wait_until() -> Callable[..., None]:
    def wait(predicate: Callable[[], object], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g} s waiting until {what}")
            time.sleep(0.01)

    return wait


@pytest.fixture
def idle(rt: Runtime, wait_until: Callable[..., None]) -> Callable[[str], None]:
    """Wait until a model runs nothing and no cache row is pinned."""

    def check(model: str) -> None:
        wait_until(lambda: rt.model(model).info().active == 0, f"{model} runs nothing")
        wait_until(lambda: all(r.refcount == 0 for r in rt.cache_rows()), "no row is pinned")

    return check
