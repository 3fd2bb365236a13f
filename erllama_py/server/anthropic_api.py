"""The Anthropic Messages API: ``POST /v1/messages`` and ``/v1/messages/count_tokens``, as
clients of the public runtime API (what coding agents speak).

A request becomes a conversation in OpenAI's shape for the chat template:
``system`` (text or blocks, joined by blank lines) first; a user turn's
``tool_result`` blocks become ``tool`` messages (an error result says so), its
text a user message; an assistant turn's ``tool_use`` blocks become its
``tool_calls``. ``tool_choice`` maps onto the shared tool machinery
(`erllama_py.server.chat_run`): ``auto``, ``any`` (required), ``tool`` (named),
``none``.

Usage: ``cache_read_input_tokens`` is the prompt prefix restored from the
cache; the rest of the prompt was prefilled, and it counts as
``cache_creation_input_tokens`` when the turn's state was saved (its
``finish_key``; the next turn that resends the conversation restores it), else as
``input_tokens``. So ``input_tokens + cache_creation_input_tokens +
cache_read_input_tokens`` is the prompt's length, as Anthropic counts.

Streams are named events: ``message_start``, per block ``content_block_start``
/ ``content_block_delta`` (``text_delta``, or a call's input in ``input_json_delta``
fragments as they are generated) / ``content_block_stop``, ``ping``, ``message_delta``
(stop reason and usage) and ``message_stop``; a failure after the stream
began is an ``error`` event. Errors before it are Anthropic's envelope, a full
queue a 529 ``overloaded_error`` with ``retry-after``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from erllama_py.errors import ErllamaError
from erllama_py.params import ChatMessage, CompletionOptions, ToolCall
from erllama_py.server import anthropic_schemas as wire
from erllama_py.server.chat_run import (
    ArgsOut,
    CallDone,
    CallStart,
    ChatEvent,
    ChatJob,
    ChatOutcome,
    Finished,
    TextOut,
    complete_chat,
    stream_chat,
)
from erllama_py.server.context import ServerContext, server_context
from erllama_py.server.errors import ApiError, Failure, anthropic_error_body, failure_of
from erllama_py.server.tools import ParsedCall, ToolChoice, ToolDef, mint_id

__all__ = ["router"]

Context = Annotated[ServerContext, Depends(server_context)]
DEFAULT_VERSION = "2023-06-01"
_ERRORS: dict[int | str, dict[str, object]] = {
    s: {"model": wire.ErrorResponse} for s in (400, 401, 404, 413, 504, 529)
}

router = APIRouter(prefix="/v1", tags=["anthropic"])


def _bad(message: str) -> ApiError:
    return ApiError(Failure(400, "invalid_request_error", message, "invalid_value"))


# ---------------------------------------------------------------------- the conversation


def _text(blocks: Sequence[wire.TextBlock]) -> str:
    return "\n\n".join(b.text for b in blocks)


def _result_text(block: wire.ToolResultBlock) -> str:
    content = block.content
    text = content if isinstance(content, str) else _text(content or [])
    return f"Error: {text}" if block.is_error else text


def _conversation(body: wire.CountTokensRequest) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    system = body.system if isinstance(body.system, str) else _text(body.system or [])
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        blocks = (
            [wire.TextBlock(type="text", text=message.content)]
            if isinstance(message.content, str)
            else message.content
        )
        texts: list[str] = []
        calls: list[ToolCall] = []
        for j, block in enumerate(blocks):
            if isinstance(block, wire.MediaBlock):
                raise _bad(f"messages.{i}.content.{j}: {block.type} blocks are not supported")
            if isinstance(block, wire.TextBlock):
                texts.append(block.text)
            elif isinstance(block, wire.ToolResultBlock):
                if message.role != "user":
                    raise _bad(f"messages.{i}.content.{j}: tool_result belongs in a user turn")
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": block.tool_use_id,
                        "content": _result_text(block),
                    }
                )
            elif isinstance(block, wire.ToolUseBlock):
                if message.role != "assistant":
                    raise _bad(f"messages.{i}.content.{j}: tool_use belongs in an assistant turn")
                function = {"name": block.name, "arguments": json.dumps(block.input)}
                calls.append({"id": block.id, "type": "function", "function": function})  # type: ignore[typeddict-item]
        if calls:
            out.append({"role": "assistant", "content": "\n\n".join(texts), "tool_calls": calls})
        elif texts or message.role == "assistant":
            out.append({"role": message.role, "content": "\n\n".join(texts)})
    return out


def _tools(body: wire.CountTokensRequest) -> tuple[list[ToolDef], ToolChoice]:
    tools = [ToolDef(t.name, t.description, t.input_schema) for t in body.tools or []]
    choice = body.tool_choice
    if choice is None:
        return tools, ToolChoice("auto")
    parallel = not choice.disable_parallel_tool_use
    if choice.type in ("any", "tool") and not tools:
        raise _bad(f"tool_choice {choice.type} needs tools")
    if choice.type == "tool":
        if not choice.name:
            raise _bad("tool_choice.name is required for type tool")
        result = ToolChoice("named", choice.name, parallel=False)
        result.offered(tools)  # a tool that is not listed is a 400 now
        return tools, result
    kind = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return tools, ToolChoice(kind, parallel=parallel)  # type: ignore[arg-type]


def _options(body: wire.MessagesRequest, ctx: ServerContext) -> CompletionOptions:
    opts: CompletionOptions = {"max_tokens": body.max_tokens, "require_room": True}
    # Anthropic's default temperature is 1 (the runtime's own default is greedy).
    opts["temperature"] = body.temperature if body.temperature is not None else 1.0
    if body.top_p is not None:
        opts["top_p"] = body.top_p
    if body.top_k is not None:
        opts["top_k"] = body.top_k
    if body.stop_sequences:
        opts["stop"] = list(body.stop_sequences)
    if ctx.settings.request_timeout_s:
        opts["timeout"] = ctx.settings.request_timeout_s
    return opts


def _job(body: wire.MessagesRequest, ctx: ServerContext) -> ChatJob:
    tools, choice = _tools(body)
    m = ctx.model(body.model)
    return ChatJob(m, _conversation(body), tools, choice, _options(body, ctx), "toolu_")


# ---------------------------------------------------------------------- the answer


def _usage(outcome: ChatOutcome) -> wire.UsageOut:
    fresh = outcome.prompt_tokens - outcome.cached_tokens
    saved = outcome.results[0].finish_key is not None
    return wire.UsageOut(
        input_tokens=0 if saved else fresh,
        output_tokens=outcome.completion_tokens,
        cache_creation_input_tokens=fresh if saved else 0,
        cache_read_input_tokens=outcome.cached_tokens,
    )


def _stop_reason(outcome: ChatOutcome) -> wire.StopReason:
    if outcome.finish == "length":
        return "max_tokens"
    if outcome.finish == "tool_calls":
        return "tool_use"
    return "stop_sequence" if outcome.stop_sequence is not None else "end_turn"


def _tool_use(call: ParsedCall) -> wire.ToolUseOut:
    return wire.ToolUseOut(id=call.id, name=call.name, input=call.input())


_VERSION = re.compile(r"[0-9A-Za-z._-]{1,64}")


def _headers(version: str | None) -> dict[str, str]:
    """The version echoed (any dated version is accepted; one that is no version at all is
    not written back into a header)."""
    echoed = version if version and _VERSION.fullmatch(version) else DEFAULT_VERSION
    return {"anthropic-version": echoed}


Version = Annotated[str | None, Header(alias="anthropic-version")]


@router.post(
    "/messages",
    response_model=wire.MessageOut,
    responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
)
async def messages(
    body: wire.MessagesRequest, request: Request, ctx: Context, version: Version = None
) -> Response:
    """An Anthropic message (``stream: true`` for named server-sent events)."""
    job = _job(body, ctx)
    await ctx.info(body.model)
    message_id = mint_id("msg_")
    if body.stream:
        return await _stream(job, ctx, body, message_id, _headers(version))
    outcome = await _until_done(request, complete_chat(job))
    for result in outcome.results:
        ctx.metrics.observe_completion(body.model, result)
    content: list[wire.TextOut | wire.ToolUseOut] = []
    if outcome.text or not outcome.calls:
        content.append(wire.TextOut(text=outcome.text))
    content += [_tool_use(c) for c in outcome.calls]
    reply = wire.MessageOut(
        id=message_id,
        model=body.model,
        content=content,
        stop_reason=_stop_reason(outcome),
        stop_sequence=outcome.stop_sequence,
        usage=_usage(outcome),
    )
    return JSONResponse(reply.model_dump(mode="json"), headers=_headers(version))


async def _until_done(request: Request, work: Awaitable[ChatOutcome]) -> ChatOutcome:
    """Run `work`; a client that goes away cancels it (and its generation)."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise ApiError(Failure(499, "invalid_request_error", "the client disconnected"))
    return task.result()


def _event(name: str, data: dict[str, object]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"type": name, **data}), event=name)


async def _stream(
    job: ChatJob, ctx: ServerContext, body: wire.MessagesRequest, message_id: str,
    headers: dict[str, str],
) -> Response:  # fmt: skip
    events = stream_chat(job)
    count = asyncio.ensure_future(job.model.achat_tokens(job.messages, tools=job.tool_specs()))
    try:
        first: ChatEvent | None = await events.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        count.cancel()
        raise
    input_tokens = len(await count)

    async def all_events() -> AsyncIterator[ChatEvent]:
        if first is not None:
            yield first
        async for event in events:
            yield event

    async def frames() -> AsyncIterator[ServerSentEvent]:
        start = wire.MessageOut(
            id=message_id, model=body.model, content=[], stop_reason=None, stop_sequence=None,
            usage=wire.UsageOut(input_tokens=input_tokens, output_tokens=0,
                                cache_creation_input_tokens=0, cache_read_input_tokens=0),
        )  # fmt: skip
        yield _event("message_start", {"message": start.model_dump(mode="json")})
        index = 0
        text_open = False
        blocks = 0
        try:
            async for event in all_events():
                if isinstance(event, TextOut):
                    if not text_open:
                        block: dict[str, object] = {"type": "text", "text": ""}
                        yield _event(
                            "content_block_start", {"index": index, "content_block": block}
                        )
                        yield _event("ping", {})
                        text_open = True
                    delta: dict[str, object] = {"type": "text_delta", "text": event.text}
                    yield _event("content_block_delta", {"index": index, "delta": delta})
                elif isinstance(event, CallStart):
                    if text_open:
                        yield _event("content_block_stop", {"index": index})
                        index, text_open, blocks = index + 1, False, blocks + 1
                    block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
                    yield _event("content_block_start", {"index": index, "content_block": block})
                elif isinstance(event, ArgsOut):
                    delta = {"type": "input_json_delta", "partial_json": event.text}
                    yield _event("content_block_delta", {"index": index, "delta": delta})
                elif isinstance(event, CallDone):
                    yield _event("content_block_stop", {"index": index})
                    index, blocks = index + 1, blocks + 1
                elif isinstance(event, Finished):
                    outcome = event.outcome
                    for result in outcome.results:
                        ctx.metrics.observe_completion(body.model, result)
                    if not text_open and not blocks:
                        block = {"type": "text", "text": ""}
                        yield _event(
                            "content_block_start", {"index": index, "content_block": block}
                        )
                        text_open = True
                    if text_open:
                        yield _event("content_block_stop", {"index": index})
                    delta = {"stop_reason": _stop_reason(outcome),
                             "stop_sequence": outcome.stop_sequence}  # fmt: skip
                    usage = _usage(outcome).model_dump(exclude={"service_tier"})
                    yield _event("message_delta", {"delta": delta, "usage": usage})
                    yield _event("message_stop", {})
        except ErllamaError as exc:
            error = anthropic_error_body(failure_of(exc), None)
            yield ServerSentEvent(data=json.dumps(error), event="error")

    return EventSourceResponse(
        frames(),
        ping=15,
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
    )


@router.post("/messages/count_tokens", response_model=wire.CountTokensResponse, responses=_ERRORS)
async def count_tokens(
    body: wire.CountTokensRequest, ctx: Context, version: Version = None
) -> Response:
    """The prompt's length in tokens, as the chat template renders it (with its tools)."""
    tools, choice = _tools(body)
    m = ctx.model(body.model)
    specs = [t.as_tool() for t in tools] if tools and choice.kind != "none" else None
    tokens = await m.achat_tokens(_conversation(body), tools=specs)
    reply = wire.CountTokensResponse(input_tokens=len(tokens))
    return JSONResponse(reply.model_dump(mode="json"), headers=_headers(version))
