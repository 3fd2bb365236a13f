"""OpenAI chat completions with ``tools``: ``tool_choice`` (``none``, ``auto``,
``required``, a named function) and ``parallel_tool_calls``, answered with
``message.tool_calls`` (ids, names, JSON-string arguments) and ``finish_reason:
"tool_calls"``, or in a stream as ``delta.tool_calls`` fragments with their ``index``:
per call, one fragment with its id, type and name, then its arguments in fragments as
the grammar-constrained tokens arrive (they concatenate to JSON that parses).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from erllama_py.errors import ErllamaError
from erllama_py.params import ChatMessage, CompletionOptions
from erllama_py.results import ModelInfo
from erllama_py.server import openai_schemas as wire
from erllama_py.server.chat_run import (
    ArgsOut,
    CallStart,
    ChatEvent,
    ChatJob,
    ChatOutcome,
    Finished,
    TextOut,
    complete_chat,
    stream_chat,
)
from erllama_py.server.context import ServerContext
from erllama_py.server.errors import ApiError, Failure, error_body, failure_of
from erllama_py.server.tools import ParsedCall, ToolChoice, ToolDef

__all__ = ["respond_with_tools", "tool_job"]

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _choice(body: wire.ChatCompletionRequest) -> ToolChoice:
    choice = body.tool_choice
    parallel = body.parallel_tool_calls
    if choice is None:
        return ToolChoice("auto", parallel=parallel)
    if isinstance(choice, wire.NamedToolChoice):
        return ToolChoice("named", choice.function.name, parallel=False)
    return ToolChoice(choice, parallel=parallel)


def tool_job(
    body: wire.ChatCompletionRequest, ctx: ServerContext, messages: list[ChatMessage],
    options: CompletionOptions,
) -> ChatJob | None:  # fmt: skip
    """The tool-aware job of a request that has tools (None: the plain chat path)."""
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise ApiError(
                Failure(
                    400,
                    "invalid_request_error",
                    "tool_choice needs tools",
                    "invalid_value",
                    "tool_choice",
                )
            )
        return None
    if body.n > 1:
        raise ApiError(
            Failure(
                400,
                "invalid_request_error",
                "n > 1 is not supported with tools",
                "invalid_value",
                "n",
            )
        )
    tools = [
        ToolDef(t.function.name, t.function.description, t.function.parameters or {})
        for t in body.tools
    ]
    choice = _choice(body)
    choice.offered(tools)  # a named tool that is not listed is a 400 now
    stops = options.get("stop") or []
    if choice.kind == "auto" and len(stops) >= wire.MAX_STOPS:
        message = f"with tools, stop takes at most {wire.MAX_STOPS - 1} sequences"
        raise ApiError(Failure(400, "invalid_request_error", message, "invalid_value", "stop"))
    return ChatJob(ctx.model(body.model), messages, tools, choice, options, "call_")


def _tool_calls(calls: list[ParsedCall]) -> list[wire.ToolCallOut] | None:
    if not calls:
        return None
    return [
        wire.ToolCallOut(id=c.id, function=wire.FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in calls
    ]


def _usage(outcome: ChatOutcome) -> wire.Usage:
    return wire.Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=outcome.cached_tokens),
    )


async def respond_with_tools(
    job: ChatJob, *, ctx: ServerContext, body: wire.ChatCompletionRequest, info: ModelInfo,
    completion_id: str, created: int, fingerprint: str,
    guard: Callable[[Awaitable[ChatOutcome]], Awaitable[ChatOutcome]],
) -> Response:  # fmt: skip
    """The response to a chat request with tools (streamed if asked); ``guard`` runs the
    whole turn (it cancels it if the client goes away)."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(
            job, ctx, body=body, completion_id=completion_id, created=created,
            fingerprint=fingerprint, include_usage=include_usage,
        )  # fmt: skip
    outcome = await guard(complete_chat(job))
    for result in outcome.results:
        ctx.metrics.observe_completion(body.model, result)
    message = wire.AssistantMessage(
        content=outcome.text or (None if outcome.calls else ""),
        tool_calls=_tool_calls(outcome.calls),
    )
    reply = wire.ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[wire.ChatChoice(index=0, message=message, finish_reason=outcome.finish)],
        usage=_usage(outcome),
        system_fingerprint=fingerprint,
    )
    return JSONResponse(reply.model_dump(mode="json"))


async def _stream(
    job: ChatJob, ctx: ServerContext, *, body: wire.ChatCompletionRequest, completion_id: str,
    created: int, fingerprint: str, include_usage: bool,
) -> Response:  # fmt: skip
    events = stream_chat(job)
    try:
        first: ChatEvent | None = await events.__anext__()
    except StopAsyncIteration:
        first = None

    def chunk(delta: wire.ChunkDelta | None, finish: str | None = None,
              usage: wire.Usage | None = None) -> str:  # fmt: skip
        choices = [] if delta is None else [
            wire.ChunkChoice(index=0, delta=delta, finish_reason=finish)  # type: ignore[arg-type]
        ]  # fmt: skip
        return wire.ChatCompletionChunk(
            id=completion_id, created=created, model=body.model, choices=choices, usage=usage,
            system_fingerprint=fingerprint,
        ).model_dump_json()  # fmt: skip

    async def all_events() -> AsyncIterator[ChatEvent]:
        if first is not None:
            yield first
        async for event in events:
            yield event

    async def frames() -> AsyncIterator[str]:
        yield chunk(wire.ChunkDelta(role="assistant", content=""))
        try:
            async for event in all_events():
                if isinstance(event, TextOut):
                    yield chunk(wire.ChunkDelta(content=event.text))
                elif isinstance(event, CallStart):
                    head = wire.ToolCallDelta(
                        index=event.index, id=event.id, type="function",
                        function=wire.FunctionCallDelta(name=event.name, arguments=""),
                    )  # fmt: skip
                    yield chunk(wire.ChunkDelta(tool_calls=[head]))
                elif isinstance(event, ArgsOut):
                    args = wire.ToolCallDelta(
                        index=event.index, function=wire.FunctionCallDelta(arguments=event.text)
                    )
                    yield chunk(wire.ChunkDelta(tool_calls=[args]))
                elif isinstance(event, Finished):
                    outcome = event.outcome
                    for result in outcome.results:
                        ctx.metrics.observe_completion(body.model, result)
                    yield chunk(wire.ChunkDelta(), outcome.finish)
                    if include_usage:
                        yield chunk(None, usage=_usage(outcome))
        except ErllamaError as exc:
            yield json.dumps(error_body(failure_of(exc)))
        yield "[DONE]"

    return EventSourceResponse(frames(), ping=15, headers=_SSE_HEADERS)
