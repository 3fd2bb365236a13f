"""schemathesis against the server's own ``/openapi.json``: for generated requests (valid
and invalid), no 500s, and every response matches its documented schema and status."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from server_helpers import server_config

from erllama_py.config import load_config
from erllama_py.server.serve import Serving, start_serving


@pytest.fixture(scope="module")
def stub_serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    root = tmp_path_factory.mktemp("schema")
    config = server_config(root, root / "unused.gguf", request_timeout_s=20)
    # Stub models only: generated requests may ask for every token of the context.
    config["models"] = [m for m in config["models"] if m["name"] == "stub"]
    serving = start_serving(load_config(config))
    yield serving
    serving.stop()


def _operations(serving: Serving) -> list[schemathesis.APIOperation]:
    loaded = schemathesis.openapi.from_url(f"{serving.url}/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


def test_the_server_answers_what_its_schema_says(stub_serving: Serving) -> None:
    operations = _operations(stub_serving)
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "GET /v1/models",
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/embeddings",
        "GET /health/ready",
        "GET /metrics",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "stub"  # else nearly every case is an unknown model's 404
            # Schema-valid requests may still be refused with a 400 for what a schema cannot
            # say (a prompt over the context, n over the model's sequences, tool calls):
            # every other check applies, a 500 or an undocumented answer fails.
            case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])

        check()
