"""Every error status, in OpenAI's envelope, and never a 500 or a trace for bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from server_helpers import server_config

from erllama_py.config import load_config
from erllama_py.server.serve import start_serving

HELLO = [{"role": "user", "content": "hello"}]


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "stub", "messages": HELLO, "temperature": 3}, "temperature"),
        ({"model": "stub", "messages": HELLO, "max_tokens": "many"}, "max_tokens"),
        ({"model": "stub", "messages": HELLO, "top_p": 0}, "top_p"),
        ({"model": "stub", "messages": []}, "messages"),
        ({"model": "stub", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "stub", "messages": HELLO, "stop": ["a"] * 17}, "stop"),
        ({"model": "stub", "messages": HELLO, "n": 0}, "n"),
        (
            {"model": "stub", "messages": HELLO, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ({"model": "stub"}, "messages"),
        ({"messages": HELLO}, "model"),
    ],
    ids=[
        "temperature",
        "max_tokens-type",
        "top_p",
        "empty-messages",
        "role",
        "stops",
        "n",
        "top_logprobs",
        "no-messages",
        "no-model",
    ],
)
def test_an_invalid_field_is_a_400_naming_it(http, body, param):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_unknown_fields_are_ignored_as_openai_does(client):
    reply = client.chat.completions.create(
        model="stub", messages=HELLO, max_tokens=2, extra_body={"frobnicate": True}
    )
    assert reply.usage.completion_tokens == 2


def test_malformed_json_is_a_400(http):
    response = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON" in _error(response)["message"]


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nobody", messages=HELLO)
    assert info.value.body["code"] == "model_not_found"


def test_an_unknown_path_is_a_404_and_a_wrong_method_a_405(http):
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert _error(missing)["code"] == "not_found"
    wrong = http.get("/v1/chat/completions")
    assert wrong.status_code == 405
    assert _error(wrong)["code"] == "method_not_allowed"


def test_a_prompt_plus_max_tokens_over_the_context_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="stub", prompt="the cat", max_tokens=600)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="stub", prompt=list(range(3, 603)), max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"


def test_a_body_over_the_cap_is_a_413(tmp_path: Path, tiny_model_path: Path):
    config = server_config(tmp_path, tiny_model_path)
    config["server"]["max_body_mb"] = 1
    config["models"] = config["models"][1:2]  # the stub only: a fast start
    serving = start_serving(load_config(config))
    try:
        big = {"model": "stub", "prompt": "x " * (700 * 1024)}
        response = httpx.post(f"{serving.url}/v1/completions", json=big, timeout=30)
        assert response.status_code == 413
        assert _error(response)["code"] == "request_too_large"

        def chunks():  # no content-length: the cap applies as the body streams in
            for _ in range(40):
                yield b"x" * 65536

        streamed = httpx.post(f"{serving.url}/v1/completions", content=chunks(), timeout=30)
        assert streamed.status_code == 413
        ok = httpx.post(
            f"{serving.url}/v1/completions",
            json={"model": "stub", "prompt": "small", "max_tokens": 1},
            timeout=30,
        )
        assert ok.status_code == 200
    finally:
        serving.stop()


def test_api_keys_close_everything_but_health(tmp_path: Path, tiny_model_path: Path):
    config = server_config(tmp_path, tiny_model_path)
    config["server"]["api_keys"] = ["sk-one", "sk-two"]
    config["models"] = config["models"][1:2]
    serving = start_serving(load_config(config))
    try:
        anonymous = openai.OpenAI(base_url=f"{serving.url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            anonymous.models.list()
        assert info.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{serving.url}/metrics").status_code == 401
        assert httpx.get(f"{serving.url}/v1/models").status_code == 401
        assert httpx.get(f"{serving.url}/health").status_code == 200
        assert httpx.get(f"{serving.url}/health/ready").status_code == 200
        for key in ("sk-one", "sk-two"):
            authed = openai.OpenAI(base_url=f"{serving.url}/v1", api_key=key, max_retries=0)
            assert [m.id for m in authed.models.list().data] == ["stub"]
    finally:
        serving.stop()


def test_a_request_past_the_servers_timeout_is_a_504(client):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="slow", prompt="the cat", max_tokens=3000)
    assert info.value.status_code == 504
    assert info.value.body["code"] == "request_timeout"


def test_ready_is_503_until_every_configured_model_is_loaded(tmp_path: Path, tiny_model_path):
    seen: list[int] = []

    def probe(url: str) -> None:
        seen.append(httpx.get(f"{url}/health").status_code)
        seen.append(httpx.get(f"{url}/health/ready").status_code)

    serving = start_serving(
        load_config(server_config(tmp_path, tiny_model_path)), on_listening=probe
    )
    try:
        assert seen == [200, 503]
        ready = httpx.get(f"{serving.url}/health/ready")
        assert ready.status_code == 200
        assert set(ready.json()["models"]) == {"tiny", "stub", "slow"}
    finally:
        serving.stop()
