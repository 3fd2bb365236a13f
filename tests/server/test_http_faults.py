"""Faults over HTTP: clients that go away, a full queue, a worker that dies, and what
the metrics say about it all."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest

from supervisors._shutdown import kill_thread


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(url, rt, idle, wait_until):
    slow = rt.model("slow")
    body = {"model": "slow", "prompt": "the cat sat", "max_tokens": 3000, "stream": True}
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one token arrived: leave
    wait_until(lambda: slow.info().requests_done >= 1, "the abandoned request ended")
    idle("slow")
    assert slow.complete("after the disconnect", max_tokens=2).usage.completion_tokens == 2


def test_a_client_that_disconnects_before_an_answer_frees_its_sequence(url, rt, idle):
    slow = rt.model("slow")
    done_before = slow.info().requests_done
    body = {"model": "slow", "prompt": "the cat " * 200, "max_tokens": 3000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
    idle("slow")
    assert slow.info().requests_done == done_before + 1
    result = slow.complete("after the timeout", max_tokens=2)
    assert result.usage.completion_tokens == 2


def test_a_full_queue_is_a_429_with_retry_after_and_admitted_requests_complete(
    url, rt, client, idle, wait_until
):
    slow = rt.model("slow")  # one sequence, a queue of two
    body = {"model": "slow", "prompt": "hold the only sequence", "max_tokens": 60}
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
        wait_until(lambda: slow.info().active == 1, "one request runs")
        queued = [
            pool.submit(httpx.post, f"{url}/v1/completions", timeout=60,
                        json={**body, "prompt": f"queued {i}", "max_tokens": 3})
            for i in range(2)
        ]  # fmt: skip
        wait_until(lambda: slow.pending_len() == 2, "two requests queued")
        refused = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert running.result().status_code == 200
        assert [q.result().status_code for q in queued] == [200, 200]
    idle("slow")


def test_a_worker_killed_under_a_request_is_a_503_and_the_model_serves_again(url, rt, wait_until):
    stub = rt.model("slow")
    pid = stub.info().worker.pid
    assert pid is not None
    started = threading.Event()
    body = {"model": "slow", "prompt": "doomed request", "max_tokens": 2000, "stream": False}

    def kill_when_running() -> None:
        wait_until(lambda: stub.info().active == 1, "the request runs")
        started.set()
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    killer.join()
    assert started.is_set()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "worker_crashed"
    assert "retry-after" in response.headers
    wait_until(lambda: stub.info().worker.state == "running", "the worker is back")
    again = httpx.post(
        f"{url}/v1/completions", json={"model": "slow", "prompt": "hi", "max_tokens": 2}
    )
    assert again.status_code == 200


def test_metrics_count_requests_tokens_cache_hits_and_read_the_runtime(client, http):
    client.completions.create(model="stub", prompt="metrics please for this test", max_tokens=3)
    client.completions.create(model="stub", prompt="metrics please for this test", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nobody", prompt="x")
    text = http.get("/metrics").text
    assert 'erllama_http_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'erllama_http_requests_total{endpoint="/v1/completions",status="404"}' in text
    assert 'erllama_cache_hits_total{kind="exact",model="stub"}' in text
    for name in (
        "erllama_http_request_duration_seconds_bucket",
        "erllama_time_to_first_token_seconds_bucket",
        'erllama_prompt_tokens_total{model="stub"}',
        'erllama_generated_tokens_total{model="stub"}',
        'erllama_cached_prompt_tokens_total{model="stub"}',
        'erllama_queue_depth{model="slow"}',
        'erllama_running_sequences{model="tiny"}',
        'erllama_worker_restarts_total{model="stub"}',
        'erllama_cache_bytes{kind="ram",tier="ram"}',
        'erllama_cache_rows{kind="disk"',
        'erllama_cache_saves_total{reason="finish"}',
        "erllama_cache_evictions_total",
    ):
        assert name in text, name


def test_every_response_carries_a_request_id_and_echoes_a_given_one(http):
    assert http.get("/health").headers["x-request-id"].startswith("req_")
    given = http.get("/v1/models", headers={"x-request-id": "trace-123"})
    assert given.headers["x-request-id"] == "trace-123"
    failed = http.get("/nowhere", headers={"x-request-id": "trace-404"})
    assert failed.status_code == 404 and failed.headers["x-request-id"] == "trace-404"


def test_a_crash_of_the_http_layer_is_restarted_on_the_same_address(serving, rt, http, wait_until):
    def http_node() -> dict:
        return next(c for c in rt.tree()["children"] if c["name"] == "http")

    before = http_node()
    assert before["state"] == "running"
    # Kill the thread that runs uvicorn: an exception escapes the server, as a crash would.
    (thread,) = [t for t in threading.enumerate() if t.name == f"http {serving.url}"]
    assert kill_thread(thread)
    wait_until(lambda: http_node()["restarts"] == before["restarts"] + 1, "http restarted")
    wait_until(lambda: _answers(serving.url), "the restarted server answers")
    assert http.get("/v1/models").status_code == 200


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
