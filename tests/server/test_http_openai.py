"""The OpenAI API family, judged by the official `openai` client and its own types.

Every response is validated with the client's pydantic models
(``Model.model_validate`` on the raw JSON: the client itself parses leniently).
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from erllama_py.runtime import Runtime

HELLO = [{"role": "user", "content": "hello there, how are you"}]


def _sse(response: Any) -> list[str]:
    """The ``data:`` payloads of a server-sent-event response, in order."""
    return [
        line[len("data: "):]
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]  # fmt: skip


# --------------------------------------------------------------------------- models


def test_models_are_listed_and_described_in_openai_shapes(client, http):
    listed = client.models.list()
    assert {m.id for m in listed.data} == {"tiny", "stub", "slow"}
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    for card in raw["data"]:
        Model.model_validate(card)
        assert card["owned_by"] == "erllama-py" and isinstance(card["created"], int)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nobody")
    assert info.value.body["code"] == "model_not_found"


# --------------------------------------------------------------------------- chat


def test_a_chat_completion_validates_as_the_clients_type_and_reports_cached_tokens(client, http):
    raw = http.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": 6, "temperature": 0},
    )
    assert raw.status_code == 200
    assert raw.headers["x-request-id"].startswith("req_")
    # server-timing: the whole server time, and the part of it spent in the runtime's API.
    timing = dict(part.strip().split(";dur=") for part in raw.headers["server-timing"].split(","))
    assert set(timing) == {"app", "lib"} and 0 < float(timing["lib"]) <= float(timing["app"])
    reply = ChatCompletion.model_validate(raw.json())
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    usage = reply.usage
    assert usage is not None and usage.completion_tokens == 6
    assert usage.total_tokens == usage.prompt_tokens + 6
    assert usage.prompt_tokens_details is not None
    assert reply.system_fingerprint and reply.system_fingerprint.startswith("fp_")
    # The same request again: its whole prompt comes from the cache.
    again = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
def test_a_chat_stream_has_the_openai_chunk_sequence(http, include_usage):
    body: dict[str, Any] = {"model": "stub", "messages": HELLO, "max_tokens": 5, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = _sse(response)
    assert frames[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(f)) for f in frames[:-1]]
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    finals = [c for c in content if c.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert content[-1] is finals[0]
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text.strip()
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 5
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert all(c.usage is None for c in chunks)
        assert all(c.choices for c in chunks)


def test_the_official_client_streams_a_chat_and_reassembles_the_non_streamed_text(client):
    plain = client.chat.completions.create(
        model="stub", messages=HELLO, max_tokens=7, temperature=0.0, seed=3
    )
    stream = client.chat.completions.create(
        model="stub", messages=HELLO, max_tokens=7, temperature=0.0, seed=3, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == plain.choices[0].message.content


def test_n_choices_prefill_the_prompt_once_and_differ_by_seed(client, rt: Runtime):
    messages = [{"role": "user", "content": "n choices from one prefill please"}]
    before = rt.counters()
    reply = client.chat.completions.create(
        model="stub", messages=messages, max_tokens=4, n=3, temperature=1.0, seed=11
    )
    grown = rt.counters().since(before)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert grown.misses == 1, "the prompt is computed once"
    assert grown.hits_exact + grown.hits_resume == 3, "each choice restores the prefill"
    assert len({c.message.content for c in reply.choices}) > 1
    assert reply.usage.completion_tokens == 12
    streamed = client.chat.completions.create(
        model="stub", messages=messages, max_tokens=4, n=2, stream=True, seed=11
    )
    ends = [c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason]
    assert sorted(ends) == [0, 1]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="slow", messages=messages, n=2)
    assert info.value.body["param"] == "n"


def test_chat_logprobs_come_in_the_openai_shape(client, http):
    raw = http.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": 4, "temperature": 0,
              "logprobs": True, "top_logprobs": 3},
    ).json()  # fmt: skip
    reply = ChatCompletion.model_validate(raw)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 4
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the best token
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HELLO, top_logprobs=2)


def test_a_json_schema_response_format_parses_and_validates(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "is the sky blue?"}],
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}},
    )
    value = json.loads(reply.choices[0].message.content)
    assert value["answer"] in ("yes", "no") and set(value) == {"answer"}
    reply = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=48, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut by max_tokens: what came is still the start of an object
        assert reply.choices[0].message.content.lstrip().startswith("{")


def test_content_parts_are_flattened_and_images_refused(client):
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]
    flat = client.chat.completions.create(
        model="stub", messages=[{"role": "user", "content": parts}], max_tokens=3, seed=1
    )
    joined = client.chat.completions.create(
        model="stub", messages=[{"role": "user", "content": "hello there"}], max_tokens=3,
        seed=1,
    )  # fmt: skip
    assert flat.choices[0].message.content == joined.choices[0].message.content
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="stub", messages=[{"role": "user", "content": image}])
    assert info.value.body["param"] == "messages[0].content[0]"


# --------------------------------------------------------------------------- completions


def test_a_completion_validates_and_echoes_and_takes_token_prompts(client, http, rt: Runtime):
    raw = http.post(
        "/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": 4,
                                 "temperature": 0, "echo": True},
    ).json()  # fmt: skip
    reply = Completion.model_validate(raw)
    assert reply.object == "text_completion"
    assert reply.choices[0].text.startswith("the cat")
    tokens = rt.model("tiny").tokenize("the cat")
    by_tokens = client.completions.create(model="tiny", prompt=tokens, max_tokens=4, temperature=0)
    plain = client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0)
    assert by_tokens.choices[0].text == plain.choices[0].text
    assert plain.usage.prompt_tokens == len(tokens)
    several = client.completions.create(
        model="stub", prompt=["one two", "three four"], max_tokens=2, n=2, temperature=0
    )
    assert [c.index for c in several.choices] == [0, 1, 2, 3]


def test_completion_logprobs_come_in_the_legacy_shape(http):
    raw = http.post(
        "/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": 3,
                                 "temperature": 0, "logprobs": 2},
    ).json()  # fmt: skip
    reply = Completion.model_validate(raw)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == reply.choices[0].text


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
def test_a_completion_stream_sends_completion_chunks_not_chat_chunks(http, include_usage):
    body: dict[str, Any] = {"model": "stub", "prompt": "the cat", "max_tokens": 4, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        frames = _sse(response)
    assert frames[-1] == "[DONE]"
    raw = [json.loads(f) for f in frames[:-1]]
    # Streamed chunks carry "finish_reason": null until the last (as OpenAI's do), which the
    # client's Completion type, written for whole responses, does not admit: check that
    # null, then validate the rest of each chunk.
    for chunk in raw:
        for choice in chunk["choices"]:
            if choice["finish_reason"] is None:
                choice["finish_reason"] = "stop"
                choice["_open"] = True
    chunks = [Completion.model_validate(c) for c in raw]
    assert all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    ends = [
        c
        for c, r in zip(chunks, raw, strict=True)
        if r["choices"] and "_open" not in r["choices"][0]
    ]
    assert len(ends) == 1 and ends[0].choices[0].finish_reason == "length"
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


# --------------------------------------------------------------------------- embeddings


def test_embeddings_come_as_floats_or_base64(client, http):
    reply = client.embeddings.create(model="tiny", input=["hello", "the cat"])
    assert [d.index for d in reply.data] == [0, 1]
    assert reply.usage.prompt_tokens > 0
    floats = http.post("/v1/embeddings", json={"model": "tiny", "input": "hello"}).json()
    CreateEmbeddingResponse.model_validate(floats)
    raw = http.post(
        "/v1/embeddings", json={"model": "tiny", "input": "hello", "encoding_format": "base64"}
    ).json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    packed = base64.b64decode(raw["data"][0]["embedding"])
    decoded = list(struct.unpack(f"<{len(packed) // 4}f", packed))
    assert decoded == pytest.approx(reply.data[0].embedding, rel=1e-6)


# --------------------------------------------------------------------------- multi-turn


def test_a_resent_conversation_gets_its_earlier_turns_from_the_cache(client):
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "you are a helpful assistant who likes cats"},
        {"role": "user", "content": "tell me about the moon and the sun"},
    ]
    cached = []
    prompts = []
    for turn in range(3):
        reply = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0
        )
        prompts.append(reply.usage.prompt_tokens)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        messages.append({"role": "user", "content": f"and then what happened on day {turn}"})
    assert cached[0] == 0
    for turn in (1, 2):
        # Everything the previous turn's prompt held comes back from the cache.
        assert cached[turn] >= prompts[turn - 1], (turn, cached, prompts)
