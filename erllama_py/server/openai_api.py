"""The OpenAI API family: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``, as clients of the public runtime API.

A request maps onto `ModelHandle` calls with typed options; the cache does the
rest: a client that resends a conversation gets its earlier turns from the
cache, token-exact (``usage.prompt_tokens_details.cached_tokens`` shows how
many), and no session state decides what a request gets. ``n`` choices prefill
the prompt once (`ModelHandle.prefill`); each choice then restores that state
(a ``parent`` hit) and samples with its own seed.

A client that disconnects, streaming or not, cancels its generation: its
sequence and pins are freed at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

import erllama_py
from erllama_py.errors import ErllamaError
from erllama_py.model_handle import ModelHandle
from erllama_py.params import ChatMessage, CompletionOptions
from erllama_py.results import Completion, Delta, Done, ModelInfo, TokenLogprob
from erllama_py.server import openai_schemas as wire
from erllama_py.server import openai_tools
from erllama_py.server.context import ServerContext, server_context
from erllama_py.server.errors import ApiError, Failure, error_body, failure_of
from erllama_py.streams import AsyncEventStream

__all__ = ["router"]

T = TypeVar("T")
Context = Annotated[ServerContext, Depends(server_context)]
_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": wire.ErrorResponse},
    401: {"model": wire.ErrorResponse},
    404: {"model": wire.ErrorResponse},
    413: {"model": wire.ErrorResponse},
    429: {"model": wire.ErrorResponse},
    503: {"model": wire.ErrorResponse},
    504: {"model": wire.ErrorResponse},
}
_STREAM_OR_JSON: dict[int | str, dict[str, object]] = {
    200: {"content": {"text/event-stream": {}}},
    **_ERRORS,
}

router = APIRouter(prefix="/v1", tags=["openai"])


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(Failure(400, "invalid_request_error", message, code, param))


# ---------------------------------------------------------------------- models


def _card(info: ModelInfo) -> wire.ModelCard:
    return wire.ModelCard(id=info.name, created=int(info.loaded_at), owned_by="erllama-py")


@router.get("/models", response_model=wire.ModelList, responses=_ERRORS)
async def list_models(ctx: Context) -> wire.ModelList:
    """Every loaded model."""
    infos = await asyncio.to_thread(ctx.runtime.models)
    return wire.ModelList(data=[_card(i) for i in infos])


@router.get("/models/{model_id:path}", response_model=wire.ModelCard, responses=_ERRORS)
async def get_model(model_id: str, ctx: Context) -> wire.ModelCard:
    """One loaded model (404 if it is not loaded)."""
    return _card(await ctx.model(model_id).ainfo())


# ---------------------------------------------------------------------- options


def _options(req: wire.ChatCompletionRequest | wire.CompletionRequest, ctx: ServerContext,
             max_tokens: int | None, logprobs: int | None) -> CompletionOptions:  # fmt: skip
    opts: CompletionOptions = {"max_tokens": max_tokens, "require_room": max_tokens is not None}
    # OpenAI's default temperature is 1 (the runtime's own default is greedy).
    opts["temperature"] = req.temperature if req.temperature is not None else 1.0
    for name in ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repeat_penalty"):  # fmt: skip
        value = getattr(req, name)
        if value is not None:
            opts[name] = value
    if req.stop is not None:
        opts["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    # As OpenAI does: a request without a seed draws its own (greedy decoding ignores it).
    opts["seed"] = req.seed if req.seed is not None else secrets.randbits(32)
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        opts["json_schema"] = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise _bad("response_format.json_schema.schema is required", "response_format")
        opts["json_schema"] = fmt.json_schema.schema_  # type: ignore[typeddict-item]
    if logprobs is not None:
        opts["logprobs"] = logprobs
    if ctx.settings.request_timeout_s:
        opts["timeout"] = ctx.settings.request_timeout_s
    return opts


def _choice_options(
    options: CompletionOptions, i: int, parent_key: str | None
) -> CompletionOptions:
    """Choice `i`'s options: its own seed, and the prompt's prefilled row as its parent."""
    out = options.copy()
    out["seed"] = (options.get("seed", 0) + i) % 2**64
    out["parent_key"] = parent_key
    return out


def _check_n(n: int, info: ModelInfo) -> None:
    if n > info.n_seq_max:
        raise _bad(f"n must be at most {info.n_seq_max} for this model", "n")


def _flatten(messages: Sequence[wire.ChatMessageIn]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, wire.TextPart):
                    param = f"messages[{i}].content[{j}]"
                    raise _bad(f"{param}: {part.type} content is not supported (text only)", param)
                texts.append(part.text)
            content = "".join(texts)
        # OpenAI's newer name for the system role, which chat templates do not know.
        role = "system" if m.role == "developer" else m.role
        message: ChatMessage = {"role": role, "content": content or ""}
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in m.tool_calls
            ]  # fmt: skip
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


# ---------------------------------------------------------------------- cancellation


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; cancel it if the client goes away first (which cancels its requests)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ErllamaError):
            await task
        # Nobody reads this answer; the status tells the access log and the metrics.
        raise ApiError(Failure(499, "invalid_request_error", "the client disconnected"))
    return task.result()


async def _timed(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, noting how long it took as the ``lib`` part of ``server-timing``."""
    started = time.perf_counter()
    try:
        return await work
    finally:
        request.state.library_ms = (time.perf_counter() - started) * 1000.0


# ---------------------------------------------------------------------- choices


@dataclass(frozen=True)
class _Prompt:
    """What to complete: a conversation, a text or token ids."""

    messages: list[ChatMessage] | None = None
    text: str | None = None
    tokens: list[int] | None = None


async def _prompt_tokens(m: ModelHandle, prompt: _Prompt) -> list[int]:
    if prompt.tokens is not None:
        return prompt.tokens
    if prompt.messages is not None:
        return await m.achat_tokens(prompt.messages)
    assert prompt.text is not None
    return await m.atokenize(prompt.text)


async def _run_choices(
    m: ModelHandle, prompt: _Prompt, n: int, options: CompletionOptions
) -> tuple[list[Completion], int | None]:
    """The `n` completions of a prompt, and the cached tokens of its one prefill (n > 1)."""
    if n == 1:
        if prompt.messages is not None:
            return [await m.achat(prompt.messages, **options)], None
        source = prompt.tokens if prompt.tokens is not None else prompt.text
        assert source is not None
        return [await m.acomplete(source, **options)], None
    tokens = await _prompt_tokens(m, prompt)
    warm = await m.aprefill(tokens)
    runs = [m.acomplete(tokens, **_choice_options(options, i, warm.finish_key)) for i in range(n)]
    return list(await asyncio.gather(*runs)), warm.usage.cached_tokens


def _streams(
    m: ModelHandle, prompt: _Prompt, *, tokens: list[int] | None, warm_key: str | None, n: int,
    options: CompletionOptions,
) -> list[AsyncEventStream]:  # fmt: skip
    if n == 1:
        if prompt.messages is not None:
            return [m.achat_stream(prompt.messages, **options)]
        source = prompt.tokens if prompt.tokens is not None else prompt.text
        assert source is not None
        return [m.astream(source, **options)]
    assert tokens is not None
    return [m.astream(tokens, **_choice_options(options, i, warm_key)) for i in range(n)]


def _usage(results: Sequence[Completion], cached: int | None = None) -> wire.Usage:
    prompt = results[0].usage.prompt_tokens if results else 0
    completion = sum(r.usage.completion_tokens for r in results)
    cached_tokens = cached if cached is not None else results[0].usage.cached_tokens
    return wire.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=cached_tokens),
    )


def _finish(result: Completion) -> Literal["stop", "length"]:
    return "length" if result.finish_reason == "length" else "stop"


def _fingerprint(info: ModelInfo) -> str:
    return f"fp_{info.fingerprint[:16]}_erllama-py-{erllama_py.__version__}"


def _chat_logprobs(entries: Sequence[TokenLogprob] | None) -> wire.ChoiceLogprobs | None:
    if entries is None:
        return None
    content = [
        wire.TokenLogprob(
            token=e.text,
            logprob=e.logprob,
            bytes=list(e.bytes),
            top_logprobs=[
                wire.TopLogprob(token=t.text, logprob=t.logprob, bytes=list(t.bytes)) for t in e.top
            ],
        )
        for e in entries
    ]
    return wire.ChoiceLogprobs(content=content)


# ---------------------------------------------------------------------- chat


@router.post(
    "/chat/completions",
    response_model=wire.ChatCompletion,
    responses=_STREAM_OR_JSON,
)
async def chat_completions(
    body: wire.ChatCompletionRequest, request: Request, ctx: Context
) -> Response:
    """A chat completion (``stream: true`` for server-sent events)."""
    m = ctx.model(body.model)
    info = await ctx.info(body.model)
    _check_n(body.n, info)
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = body.top_logprobs if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (top or 0) if body.logprobs else None
    options = _options(body, ctx, max_tokens, logprobs)
    messages = _flatten(body.messages)
    prompt = _Prompt(messages=messages)
    created = int(time.time())
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    job = openai_tools.tool_job(body, ctx, messages, options)
    if job is not None:
        return await openai_tools.respond_with_tools(
            job, ctx=ctx, body=body, info=info, completion_id=completion_id, created=created,
            fingerprint=_fingerprint(info), guard=lambda work: _unless_disconnected(request, work),
        )  # fmt: skip
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _chat_stream(
            ctx=ctx, m=m, info=info, prompt=prompt, body=body, options=options,
            completion_id=completion_id, created=created, include_usage=include_usage,
        )  # fmt: skip
    results, cached = await _unless_disconnected(
        request, _timed(request, _run_choices(m, prompt, body.n, options))
    )
    for result in results:
        ctx.metrics.observe_completion(body.model, result)
    reply = wire.ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[
            wire.ChatChoice(
                index=i,
                message=wire.AssistantMessage(content=r.text),
                finish_reason=_finish(r),
                logprobs=_chat_logprobs(r.logprobs),
            )
            for i, r in enumerate(results)
        ],
        usage=_usage(results, cached),
        system_fingerprint=_fingerprint(info),
    )
    return JSONResponse(reply.model_dump(mode="json"))


async def _open_streams(
    m: ModelHandle, prompt: _Prompt, n: int, options: CompletionOptions
) -> tuple[list[AsyncEventStream], int | None]:
    if n == 1:
        return _streams(m, prompt, tokens=None, warm_key=None, n=1, options=options), None
    tokens = await _prompt_tokens(m, prompt)
    warm = await m.aprefill(tokens)
    streams = _streams(m, prompt, tokens=tokens, warm_key=warm.finish_key, n=n, options=options)
    return streams, warm.usage.cached_tokens


async def _merged(streams: Sequence[AsyncEventStream]) -> AsyncIterator[tuple[int, Delta | Done]]:
    """The events of several streams as they come, each with its stream's index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Delta | Done | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncEventStream) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
        except BaseException as exc:  # handed to the reader, which raises it
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


async def _first_event(
    events: AsyncIterator[tuple[int, Delta | Done]],
) -> tuple[int, Delta | Done] | None:
    """Wait for the first event, so that a refusal (a full queue, a bad grammar) is still a
    plain HTTP error rather than an error inside a 200 stream."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _chat_stream(
    *, ctx: ServerContext, m: ModelHandle, info: ModelInfo, prompt: _Prompt,
    body: wire.ChatCompletionRequest, options: CompletionOptions, completion_id: str,
    created: int, include_usage: bool,
) -> Response:  # fmt: skip
    streams, cached = await _open_streams(m, prompt, body.n, options)
    events = _merged(streams)
    first = await _first_event(events)
    fingerprint = _fingerprint(info)

    def chunk(choices: list[wire.ChunkChoice], usage: wire.Usage | None = None) -> str:
        return wire.ChatCompletionChunk(
            id=completion_id, created=created, model=body.model, choices=choices,
            usage=usage, system_fingerprint=fingerprint,
        ).model_dump_json()  # fmt: skip

    async def frames() -> AsyncIterator[str]:
        results: list[Completion] = []
        started: set[int] = set()
        try:
            async for i, event in _with_first(first, events):
                if i not in started:
                    started.add(i)
                    role = wire.ChunkDelta(role="assistant", content="")
                    yield chunk([wire.ChunkChoice(index=i, delta=role)])
                if isinstance(event, Delta):
                    if event.text or event.logprobs:
                        delta = wire.ChunkDelta(content=event.text)
                        logprobs = _chat_logprobs(event.logprobs)
                        yield chunk([wire.ChunkChoice(index=i, delta=delta, logprobs=logprobs)])
                else:
                    result = event.completion
                    results.append(result)
                    ctx.metrics.observe_completion(body.model, result)
                    end = wire.ChunkDelta()
                    yield chunk(
                        [wire.ChunkChoice(index=i, delta=end, finish_reason=_finish(result))]
                    )
            if include_usage and results:
                yield chunk([], _usage(results, cached))
        except ErllamaError as exc:
            yield _error_frame(exc)
        yield "[DONE]"

    return EventSourceResponse(frames(), ping=15, headers=_SSE_HEADERS)


_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _error_frame(exc: ErllamaError) -> str:
    """A failure after the stream began: one error frame (OpenAI's envelope), then [DONE]."""
    return json.dumps(error_body(failure_of(exc)))


async def _with_first(
    first: tuple[int, Delta | Done] | None, rest: AsyncIterator[tuple[int, Delta | Done]]
) -> AsyncIterator[tuple[int, Delta | Done]]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


# ---------------------------------------------------------------------- completions


def _completion_prompts(prompt: wire.Prompt) -> list[_Prompt]:
    """The prompts of a completions (or embeddings) request: a text, texts, token ids, or
    lists of token ids (the schema admits nothing else)."""
    if isinstance(prompt, str):
        return [_Prompt(text=prompt)]
    out: list[_Prompt] = []
    ids: list[int] = []
    for item in prompt:
        if isinstance(item, str):
            out.append(_Prompt(text=item))
        elif isinstance(item, int):
            ids.append(item)
        else:
            out.append(_Prompt(tokens=list(item)))
    return [_Prompt(tokens=ids)] if ids else out


def _completion_logprobs(
    entries: Sequence[TokenLogprob] | None, offset: int
) -> wire.CompletionLogprobs | None:
    if entries is None:
        return None
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    position = offset
    for entry in entries:
        tokens.append(entry.text)
        logprobs.append(entry.logprob)
        tops.append({t.text: t.logprob for t in entry.top})
        offsets.append(position)
        position += len(entry.text)
    return wire.CompletionLogprobs(
        tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets
    )


async def _echo_text(m: ModelHandle, prompt: _Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    assert prompt.tokens is not None
    return await m.adetokenize(prompt.tokens)


@router.post("/completions", response_model=wire.Completion, responses=_STREAM_OR_JSON)
async def completions(body: wire.CompletionRequest, request: Request, ctx: Context) -> Response:
    """A text completion of one prompt or several (``stream: true`` for server-sent events)."""
    m = ctx.model(body.model)
    info = await ctx.info(body.model)
    _check_n(body.n, info)
    if body.suffix:
        raise _bad("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise _bad("best_of is not supported (it must equal n)", "best_of")
    prompts = _completion_prompts(body.prompt)
    options = _options(body, ctx, body.max_tokens, body.logprobs)
    if body.max_tokens == 0:
        options["require_room"] = False
    created = int(time.time())
    completion_id = f"cmpl-{secrets.token_hex(12)}"
    if body.stream:
        if len(prompts) > 1:
            raise _bad("streaming takes one prompt", "prompt")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _completion_stream(
            ctx=ctx, m=m, info=info, prompt=prompts[0], body=body, options=options,
            completion_id=completion_id, created=created, include_usage=include_usage,
        )  # fmt: skip

    async def run_all() -> list[tuple[_Prompt, list[Completion], int | None]]:
        runs = [_run_choices(m, p, body.n, options) for p in prompts]
        done = await asyncio.gather(*runs)
        return [(p, results, cached) for p, (results, cached) in zip(prompts, done, strict=True)]

    outcome = await _unless_disconnected(request, _timed(request, run_all()))
    choices: list[wire.CompletionChoice] = []
    all_results: list[Completion] = []
    prompt_tokens = completion_tokens = cached_tokens = 0
    for p_index, (prompt, results, cached) in enumerate(outcome):
        echo = await _echo_text(m, prompt) if body.echo else ""
        for j, result in enumerate(results):
            ctx.metrics.observe_completion(body.model, result)
            choices.append(
                wire.CompletionChoice(
                    index=p_index * body.n + j,
                    text=echo + result.text,
                    finish_reason=_finish(result),
                    logprobs=_completion_logprobs(result.logprobs, len(echo)),
                )
            )
        all_results += results
        usage = _usage(results, cached)
        prompt_tokens += usage.prompt_tokens
        completion_tokens += usage.completion_tokens
        assert usage.prompt_tokens_details is not None
        cached_tokens += usage.prompt_tokens_details.cached_tokens
    reply = wire.Completion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=choices,
        usage=wire.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=cached_tokens),
        ),
        system_fingerprint=_fingerprint(info),
    )
    return JSONResponse(reply.model_dump(mode="json"))


async def _completion_stream(
    *, ctx: ServerContext, m: ModelHandle, info: ModelInfo, prompt: _Prompt,
    body: wire.CompletionRequest, options: CompletionOptions, completion_id: str,
    created: int, include_usage: bool,
) -> Response:  # fmt: skip
    streams, cached = await _open_streams(m, prompt, body.n, options)
    events = _merged(streams)
    first = await _first_event(events)
    fingerprint = _fingerprint(info)
    echo = await _echo_text(m, prompt) if body.echo else ""

    def chunk(choices: list[wire.CompletionChoice], usage: wire.Usage | None = None) -> str:
        return wire.Completion(
            id=completion_id, created=created, model=body.model, choices=choices,
            usage=usage, system_fingerprint=fingerprint,
        ).model_dump_json()  # fmt: skip

    async def frames() -> AsyncIterator[str]:
        results: list[Completion] = []
        offsets = dict.fromkeys(range(body.n), len(echo))
        try:
            if echo:
                for i in range(body.n):
                    yield chunk([wire.CompletionChoice(index=i, text=echo, finish_reason=None)])
            async for i, event in _with_first(first, events):
                if isinstance(event, Delta):
                    if not (event.text or event.logprobs):
                        continue
                    logprobs = _completion_logprobs(event.logprobs, offsets[i])
                    offsets[i] += len(event.text)
                    choice = wire.CompletionChoice(
                        index=i, text=event.text, finish_reason=None, logprobs=logprobs
                    )
                    yield chunk([choice])
                else:
                    result = event.completion
                    results.append(result)
                    ctx.metrics.observe_completion(body.model, result)
                    yield chunk(
                        [wire.CompletionChoice(index=i, text="", finish_reason=_finish(result))]
                    )
            if include_usage and results:
                yield chunk([], _usage(results, cached))
        except ErllamaError as exc:
            yield _error_frame(exc)
        yield "[DONE]"

    return EventSourceResponse(frames(), ping=15, headers=_SSE_HEADERS)


# ---------------------------------------------------------------------- embeddings


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/embeddings", response_model=wire.EmbeddingResponse, responses=_ERRORS)
async def embeddings(body: wire.EmbeddingRequest, ctx: Context) -> wire.EmbeddingResponse:
    """One embedding per input (text or token ids)."""
    m = ctx.model(body.model)
    info = await ctx.info(body.model)
    if body.dimensions is not None and body.dimensions != info.n_embd:
        raise _bad(f"dimensions must be {info.n_embd} for this model", "dimensions")
    prompts = _completion_prompts(body.input)
    token_lists = [await _prompt_tokens(m, p) for p in prompts]
    vectors = await m.aembed_tokens(token_lists)
    n_tokens = sum(len(t) for t in token_lists)
    return wire.EmbeddingResponse(
        data=[
            wire.Embedding(index=i, embedding=_encode(v, body.encoding_format))
            for i, v in enumerate(vectors)
        ],
        model=body.model,
        usage=wire.EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens),
    )
