"""One chat turn with tools, for both API families: run it whole or as a stream of typed
events, whatever the tool choice (see `erllama_py.server.tools` for the mechanism).

Without tools (or with ``none``) a turn is one `ModelHandle.achat`. With a
forced choice it is one grammar-constrained chat whose output is read into
calls. With ``auto`` the model writes freely while the server watches for the
start of a call in its family's syntax (`erllama_py.server.tool_syntax`, chosen
from the model's chat template): a text marker is a stop sequence, a marker that
is a control token of the vocabulary a stop token, and a marker that counts only
at the start of the reply (Llama 3's bare ``{"name"``) is watched in the stream,
the reply's text held back until it is decided. Once a marker is seen, the call
is generated under the grammar from exactly the tokens the model had (prompt +
generated, the first run's ``finish_key`` as parent, so the state comes from the
cache rather than a second prefill; for a start marker, the prompt itself).

Calls are streamed as they are generated (`tool_stream.CallScanner`): a
`CallStart` with the call's id and name, `ArgsOut` fragments of its arguments'
JSON, a `CallDone`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from erllama_py.model_handle import ModelHandle
from erllama_py.params import ChatMessage, CompletionOptions, Tool
from erllama_py.results import Completion, Delta
from erllama_py.server.tool_stream import CallArgs, CallEnd, CallHead, CallScanner
from erllama_py.server.tool_syntax import StartWatch, ToolSyntax, syntax_for
from erllama_py.server.tools import (
    ParsedCall,
    ToolChoice,
    ToolDef,
    call_grammar,
    continuation_grammar,
    mint_id,
    parse_calls,
)
from erllama_py.streams import AsyncEventStream

__all__ = [
    "ArgsOut",
    "CallDone",
    "CallStart",
    "ChatEvent",
    "ChatJob",
    "ChatOutcome",
    "Finished",
    "TextOut",
    "ToolWatch",
    "complete_chat",
    "stream_chat",
    "tool_watch",
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
class CallStart:
    """A call begins: its index in the turn, its id and the function's name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgsOut:
    """A fragment of call ``index``'s arguments (JSON text; the fragments concatenate)."""

    index: int
    text: str


@dataclass(frozen=True)
class CallDone:
    """Call ``index`` is written (its arguments are complete unless the turn ran out)."""

    index: int


@dataclass(frozen=True)
class Finished:
    """The last event."""

    outcome: ChatOutcome


ChatEvent = TextOut | CallStart | ArgsOut | CallDone | Finished


@dataclass(frozen=True)
class ToolWatch:
    """What to watch for in one model's replies: its family's syntax, the markers that are
    text (stop sequences) and those that are control tokens (stop tokens, by id)."""

    syntax: ToolSyntax
    stops: tuple[str, ...]
    tokens: frozenset[int]


_WATCHES: dict[tuple[str, str | None], ToolWatch] = {}


async def tool_watch(model: ModelHandle) -> ToolWatch:
    """The model's `ToolWatch`, from its chat template and vocabulary (cached)."""
    template = model.chat_template_text()
    key = (model.name, template)
    known = _WATCHES.get(key)
    if known is not None:
        return known
    syntax = syntax_for(template)
    tokens = set()
    for text in syntax.anywhere:
        ids = await model.atokenize(text, False, True)
        if len(ids) == 1 and not await model.adetokenize(ids):
            tokens.add(ids[0])  # a control token: renders as no text, so watched by id
    watch = ToolWatch(syntax, syntax.anywhere, frozenset(tokens))
    if len(_WATCHES) > 64:
        _WATCHES.clear()
    _WATCHES[key] = watch
    return watch


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


def _base_options(job: ChatJob) -> CompletionOptions:
    options = job.options.copy()
    options.pop("json_schema", None)  # tools take precedence over response_format
    return options


class _Calls:
    """The calls of a constrained run, followed as its text arrives."""

    def __init__(self, job: ChatJob, text: str = "") -> None:
        self._job = job
        self._scanner = CallScanner()
        self._ids: list[str] = []
        self._open: int | None = None
        self.text = ""
        self.pending = self.feed(text)

    def feed(self, text: str) -> list[ChatEvent]:
        self.text += text
        out: list[ChatEvent] = []
        for event in self._scanner.feed(text):
            if isinstance(event, CallHead):
                self._ids.append(mint_id(self._job.id_prefix))
                self._open = event.index
                out.append(CallStart(event.index, self._ids[-1], event.name))
            elif isinstance(event, CallArgs):
                out.append(ArgsOut(event.index, event.text))
            elif isinstance(event, CallEnd):
                self._open = None
                out.append(CallDone(event.index))
        return out

    def finish(self) -> tuple[list[ChatEvent], list[ParsedCall]]:
        """The events still due and the turn's complete calls (streamed ones keep their
        ids; any the scanner could not follow are sent whole now)."""
        out: list[ChatEvent] = []
        if self._open is not None:
            out.append(CallDone(self._open))
            self._open = None
        calls = []
        for i, call in enumerate(parse_calls(self.text, self._job.tools, self._job.id_prefix)):
            if i < len(self._ids):
                calls.append(ParsedCall(self._ids[i], call.name, call.arguments))
            else:
                out += [CallStart(i, call.id, call.name), ArgsOut(i, call.arguments), CallDone(i)]
                calls.append(call)
        return out, calls


async def _constrained(
    stream: AsyncEventStream, calls: _Calls
) -> AsyncIterator[ChatEvent | Completion]:
    """The events of a grammar-constrained run, then its `Completion`."""
    for event in calls.pending:
        yield event
    result: Completion | None = None
    try:
        async for item in stream:
            if isinstance(item, Delta):
                for event in calls.feed(item.text):
                    yield event
            else:
                result = item.completion
    finally:
        await stream.aclose()
    assert result is not None
    yield result


async def _plain(job: ChatJob) -> AsyncIterator[ChatEvent]:
    stream = job.model.achat_stream(job.messages, tools=job.tool_specs(), **job.options)
    first: Completion | None = None
    try:
        async for event in stream:
            if isinstance(event, Delta):
                if event.text:
                    yield TextOut(event.text)
            else:
                first = event.completion
    finally:
        await stream.aclose()
    assert first is not None
    yield Finished(_outcome(first.text, [], [first], True))


async def _forced(job: ChatJob, watch: ToolWatch) -> AsyncIterator[ChatEvent]:
    options = _base_options(job)
    options["grammar"] = call_grammar(job.tools, job.choice, watch.syntax)
    stream = job.model.achat_stream(job.messages, tools=job.tool_specs(), **options)
    calls = _Calls(job)
    first: Completion | None = None
    async for item in _constrained(stream, calls):
        if isinstance(item, Completion):
            first = item
        else:
            yield item
    assert first is not None
    rest, parsed = calls.finish()
    for event in rest:
        yield event
    yield Finished(_outcome("", parsed, [first], False))


def _continuation(
    job: ChatJob, watch: ToolWatch, tokens: list[int], parent: str | None, used: int
) -> AsyncEventStream:
    """The calls after a marker, generated from ``tokens`` under the grammar."""
    options = _base_options(job)
    options.pop("stop", None)  # a stop sequence must not cut the call's JSON
    options["grammar"] = continuation_grammar(job.tools, job.choice, watch.syntax)
    options["parent_key"] = parent
    budget = options.get("max_tokens")
    if budget is not None:
        options["max_tokens"] = max(1, budget - used)
    return job.model.astream(tokens, **options)


async def _auto(job: ChatJob, watch: ToolWatch) -> AsyncIterator[ChatEvent]:
    m = job.model
    options = _base_options(job)
    options["stop"] = [*(options.get("stop") or []), *watch.stops]
    if watch.tokens:
        options["stop_tokens"] = sorted(watch.tokens)
    start = StartWatch(watch.syntax.start) if watch.syntax.start else None
    held: list[Delta] = []  # the reply's first pieces while its start is undecided
    first: Completion | None = None
    stream = m.achat_stream(job.messages, tools=job.tool_specs(), **options)
    try:
        async for event in stream:
            if not isinstance(event, Delta):
                first = event.completion
            elif start is not None and start.state == "call":
                pass  # cancelled: what follows is not the reply
            elif start is not None and start.state == "undecided":
                held.append(event)
                state = start.feed(event.text)
                if state == "call":
                    stream.cancel()
                elif state == "text":
                    yield TextOut("".join(d.text for d in held))
            elif event.text:
                yield TextOut(event.text)
    finally:
        await stream.aclose()
    assert first is not None
    if start is not None and start.state == "undecided" and start.text:
        yield TextOut(start.text)
    user_stops = job.options.get("stop") or []
    if start is not None and start.state == "call":
        blank = 0  # the held pieces before the marker began (blanks only)
        while blank < len(held) and not held[blank].text.strip():
            blank += 1
        lead_tokens = [t for d in held[:blank] for t in d.tokens]
        prompt = await m.achat_tokens(job.messages, tools=job.tool_specs())
        text, tokens, parent, used = "", prompt + lead_tokens, None, len(lead_tokens)
        lead = ""
    elif first.stop_sequence in watch.stops and first.stop_sequence not in user_stops:
        marker = first.stop_sequence
        assert marker is not None
        prompt = await m.achat_tokens(job.messages, tools=job.tool_specs())
        tokens, parent = prompt + first.tokens, first.finish_key
        generated = await m.adetokenize(first.tokens)
        if not generated.endswith(marker):  # the marker ended inside a token
            tokens = prompt + await m.atokenize(first.text + marker, False)
            parent = None
        text, used, lead = first.text, len(first.tokens), marker
    elif first.finish_reason == "stop" and first.tokens and first.tokens[-1] in watch.tokens:
        prompt = await m.achat_tokens(job.messages, tools=job.tool_specs())
        text, tokens, parent, used = (
            first.text,
            prompt + first.tokens,
            first.finish_key,
            len(first.tokens),
        )
        lead = ""
    else:
        yield Finished(_outcome(first.text, [], [first], True))
        return
    calls = _Calls(job, lead)
    rest: Completion | None = None
    async for item in _constrained(_continuation(job, watch, tokens, parent, used), calls):
        if isinstance(item, Completion):
            rest = item
        else:
            yield item
    assert rest is not None
    tail, parsed = calls.finish()
    for due in tail:
        yield due
    yield Finished(_outcome(text, parsed, [first, rest], False))


async def stream_chat(job: ChatJob) -> AsyncIterator[ChatEvent]:
    """Run a turn as events: text as it comes, calls as they are generated, then
    `Finished`.

    The first event is awaited before anything else happens, so a refusal (a
    full queue, a bad grammar) surfaces from the first ``__anext__``.
    """
    if not job.with_tools:
        events = _plain(job)
    else:
        watch = await tool_watch(job.model)
        events = _forced(job, watch) if job.choice.kind != "auto" else _auto(job, watch)
    async for item in events:
        yield item


async def complete_chat(job: ChatJob) -> ChatOutcome:
    """Run a turn to its end."""
    if not job.with_tools:
        first = await job.model.achat(job.messages, **job.options)
        return _outcome(first.text, [], [first], True)
    async for event in stream_chat(job):
        if isinstance(event, Finished):
            return event.outcome
    raise AssertionError("a chat turn ended without its outcome")
