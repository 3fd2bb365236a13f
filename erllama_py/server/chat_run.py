"""One chat turn with tools, for both API families: run it whole or as a stream of typed
events, whatever the tool choice (see `erllama_py.server.tools` for the mechanism).

Without tools (or with ``none``) a turn is one `ModelHandle.achat`. With a
forced choice it is one grammar-constrained chat whose output is parsed into
calls. With ``auto`` the model writes freely until it stops on the call marker;
the call is then generated under the grammar from exactly the tokens it had
(prompt + generated, the first run's ``finish_key`` as parent), so the state
comes from the cache rather than a second prefill.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from erllama_py.model_handle import ModelHandle
from erllama_py.params import ChatMessage, CompletionOptions, Tool
from erllama_py.results import Completion, Delta
from erllama_py.server.tools import (
    TOOL_CALL_OPEN,
    ParsedCall,
    ToolChoice,
    ToolDef,
    call_grammar,
    continuation_grammar,
    parse_calls,
)

__all__ = [
    "CallsOut",
    "ChatJob",
    "ChatOutcome",
    "Finished",
    "TextOut",
    "complete_chat",
    "stream_chat",
]

Finish = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class ChatJob:
    """What to run: a model, the conversation, the tools, the choice, the options."""

    model: ModelHandle
    messages: list[ChatMessage]
    tools: list[ToolDef]
    choice: ToolChoice
    options: CompletionOptions
    id_prefix: str = "call_"

    @property
    def with_tools(self) -> bool:
        return bool(self.tools) and self.choice.kind != "none"

    def tool_specs(self) -> list[Tool] | None:
        return [t.as_tool() for t in self.tools] if self.with_tools else None


@dataclass(frozen=True)
class ChatOutcome:
    """A finished turn: its text, its calls, why it ended, and its token counts."""

    text: str
    calls: list[ParsedCall]
    finish: Finish
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    results: list[Completion]


@dataclass(frozen=True)
class TextOut:
    """Streamed text."""

    text: str


@dataclass(frozen=True)
class CallsOut:
    """Calls, each complete, as soon as their JSON is."""

    calls: list[ParsedCall]


@dataclass(frozen=True)
class Finished:
    """The last event."""

    outcome: ChatOutcome


ChatEvent = TextOut | CallsOut | Finished


def _finish(result: Completion, calls: Sequence[ParsedCall]) -> Finish:
    if result.finish_reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def _outcome(
    text: str, calls: list[ParsedCall], results: list[Completion], user_stop: bool
) -> ChatOutcome:
    first, last = results[0], results[-1]
    stop = first.stop_sequence if user_stop else None
    return ChatOutcome(
        text=text,
        calls=calls,
        finish=_finish(last, calls),
        stop_sequence=stop,
        prompt_tokens=first.usage.prompt_tokens,
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        cached_tokens=first.usage.cached_tokens,
        results=results,
    )


def _first_options(job: ChatJob) -> CompletionOptions:
    options = job.options.copy()
    if not job.with_tools:
        return options
    options.pop("json_schema", None)  # tools take precedence over response_format
    if job.choice.kind == "auto":
        options["stop"] = [*(options.get("stop") or []), TOOL_CALL_OPEN]
    else:
        options["grammar"] = call_grammar(job.tools, job.choice)
    return options


async def _continuation(job: ChatJob, first: Completion) -> Completion:
    """The call after the marker ``first`` stopped on, from exactly its state."""
    m = job.model
    prompt = await m.achat_tokens(job.messages, tools=job.tool_specs())
    tokens = prompt + first.tokens
    generated = await m.adetokenize(first.tokens)
    parent = first.finish_key
    if not generated.endswith(TOOL_CALL_OPEN):  # the marker ended inside a token
        tokens = prompt + await m.atokenize(first.text + TOOL_CALL_OPEN, False)
        parent = None
    options = job.options.copy()
    options.pop("json_schema", None)
    options.pop("stop", None)  # a stop sequence must not cut the call's JSON
    options["grammar"] = continuation_grammar(job.tools, job.choice)
    options["parent_key"] = parent
    budget = options.get("max_tokens")
    if budget is not None:
        options["max_tokens"] = max(1, budget - len(first.tokens))
    return await m.acomplete(tokens, **options)


async def complete_chat(job: ChatJob) -> ChatOutcome:
    """Run a turn to its end."""
    first = await job.model.achat(job.messages, tools=job.tool_specs(), **_first_options(job))
    if not job.with_tools:
        return _outcome(first.text, [], [first], True)
    if job.choice.kind != "auto":
        return _outcome("", parse_calls(first.text, job.tools, job.id_prefix), [first], False)
    if first.stop_sequence != TOOL_CALL_OPEN:
        return _outcome(first.text, [], [first], True)
    rest = await _continuation(job, first)
    calls = parse_calls(TOOL_CALL_OPEN + rest.text, job.tools, job.id_prefix)
    return _outcome(first.text, calls, [first, rest], False)


async def stream_chat(job: ChatJob) -> AsyncIterator[ChatEvent]:
    """Run a turn as events: text as it comes, calls as each completes, then `Finished`.

    The first event is awaited before anything else happens, so a refusal (a
    full queue, a bad grammar) surfaces from the first ``__anext__``.
    """
    forced = job.with_tools and job.choice.kind != "auto"
    stream = job.model.achat_stream(job.messages, tools=job.tool_specs(), **_first_options(job))
    first: Completion | None = None
    text = ""
    streamed: list[ParsedCall] = []  # forced calls sent so far: their ids are final
    try:
        async for event in stream:
            if isinstance(event, Delta):
                if forced:
                    text += event.text
                    calls = parse_calls(text, job.tools, job.id_prefix)
                    if len(calls) > len(streamed):
                        yield CallsOut(calls[len(streamed) :])
                        streamed += calls[len(streamed) :]
                elif event.text:
                    yield TextOut(event.text)
            else:
                first = event.completion
    finally:
        await stream.aclose()
    assert first is not None
    if not job.with_tools:
        yield Finished(_outcome(first.text, [], [first], True))
        return
    if forced:
        rest = parse_calls(first.text, job.tools, job.id_prefix)[len(streamed) :]
        if rest:
            yield CallsOut(rest)
        yield Finished(_outcome("", streamed + rest, [first], False))
        return
    if first.stop_sequence != TOOL_CALL_OPEN:
        yield Finished(_outcome(first.text, [], [first], True))
        return
    cont = await _continuation(job, first)
    calls = parse_calls(TOOL_CALL_OPEN + cont.text, job.tools, job.id_prefix)
    if calls:
        yield CallsOut(calls)
    yield Finished(_outcome(first.text, calls, [first, cont], False))
