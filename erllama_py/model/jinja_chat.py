"""Chat prompts through a GGUF's own Jinja template, rendered in a sandbox.

Rendered as the Hugging Face and llama-cpp-python ecosystems do: Jinja2's
``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks`` and the
loop controls, and the variables templates expect (``messages``, ``tools``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``,
``strftime_now``; ``tojson`` as ``json.dumps``). Assistant tool calls reach the
template with their ``arguments`` parsed into a mapping (what HF templates
index and ``tojson``).

A template is data from a model file, so it is not trusted: the sandbox
refuses attribute access outside it (``().__class__``...); ``range`` and every
loop over the messages and tools draw on a budget of iterations for the whole
render, string and list repetition and
``%``/``format`` widths are capped, and the output is bounded in size and in
time as it is produced. A template that breaks any of this, fails to parse,
or calls ``raise_exception`` is an `InvalidRequestError` (a 400), never a crash.

Templates with no tool support (no ``tools`` variable), and llama.cpp's
built-in families, get tools through `generic_tool_messages`: a system prompt
listing the tools' schemas and asking for calls written as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the documented
marker the server watches for), with earlier calls and tool results written
as text in that same form.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from erllama_py.errors import InvalidRequestError

__all__ = [
    "MAX_RANGE_ITEMS",
    "MAX_RENDER_CHARS",
    "RENDER_DEADLINE_S",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "generic_tool_messages",
    "is_jinja",
    "render_jinja",
    "supports_tools",
]

MAX_RENDER_CHARS = 4 << 20  # the rendered prompt, as llama_chat.MAX_RENDERED_BYTES
MAX_RANGE_ITEMS = 1_000_000  # iterations of every range() of one render together
MAX_REPEAT_CHARS = 1 << 20  # one "x" * n or [..] * n
RENDER_DEADLINE_S = 5.0
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_WIDE = re.compile(r"%[-#0 +]*\d{5,}|\{[^}]*:[^}]*\d{5,}[^}]*\}")


class _Budget:
    """What one render may still spend."""

    def __init__(self) -> None:
        self.items = MAX_RANGE_ITEMS
        self.deadline = time.monotonic() + RENDER_DEADLINE_S

    def spend(self, n: int = 1) -> None:
        self.items -= n
        if self.items < 0:
            raise _Refused(f"the chat template iterates more than {MAX_RANGE_ITEMS} times")
        if self.items % 1024 == 0:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Refused(f"the chat template took longer than {RENDER_DEADLINE_S:g} s")


class _Refused(Exception):
    """A template went over a bound."""


class _Counted(list[Any]):
    """A list whose iteration draws on the render's budget, as ``range`` does (so nested
    loops over the messages cannot run away either); its slices are counted too."""

    def __init__(self, items: Sequence[Any], budget: _Budget) -> None:
        super().__init__(items)
        self._budget = budget  # private: the sandbox refuses names starting with "_"

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            self._budget.spend()
            yield item

    def __getitem__(self, key: Any) -> Any:
        got = super().__getitem__(key)
        return _Counted(got, self._budget) if isinstance(key, slice) else got


def _counted(value: Any, budget: _Budget) -> Any:
    """``value`` with every list in it (at any depth) a `_Counted`."""
    if isinstance(value, Mapping):
        return {k: _counted(v, budget) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return _Counted([_counted(v, budget) for v in value], budget)
    return value


class _Env(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(n, int)
                if sized and len(seq) * n > MAX_REPEAT_CHARS:
                    raise _Refused("the chat template builds a string or list too large")
        elif operator == "**":
            if isinstance(right, int) and abs(right) > 64:
                raise _Refused("the chat template raises to a power too large")
        elif operator == "%" and isinstance(left, str) and _WIDE.search(left):
            raise _Refused("the chat template formats with a width too large")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        if _WIDE.search(str(getattr(value, "__self__", ""))):
            raise _Refused("the chat template formats with a width too large")
        return wrapped


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"the chat template refused the request: {message}", param="messages")


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:  # fmt: skip
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def is_jinja(template: str) -> bool:
    """Whether ``template`` is Jinja text (else it names a llama.cpp built-in family)."""
    return "{%" in template or "{{" in template


def supports_tools(template: str | None) -> bool:
    """Whether a Jinja template renders ``tools`` itself (else they go in a system prompt)."""
    return (
        template is not None
        and is_jinja(template)
        and re.search(r"\btools\b", template) is not None
    )


def _call_for_template(call: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(call)
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    out["function"] = function
    return out


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a string", param="messages")
        if content is not None and not isinstance(content, str):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string (flatten content parts first)",
                param="messages",
            )
        message = dict(m)
        if m.get("tool_calls"):
            message["tool_calls"] = [_call_for_template(c) for c in m["tool_calls"]]
        out.append(message)
    return out


def render_jinja(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render ``messages`` (and ``tools``, OpenAI's ``{"type": "function", ...}`` shape)
    with the Jinja ``template``, within the bounds of the module docstring.

    Raises:
        InvalidRequestError: the template does not parse, fails, refuses the
            conversation (``raise_exception``) or goes over a bound.
    """
    budget = _Budget()

    def bounded_range(*args: int) -> Iterator[int]:
        for i in range(*args):
            budget.spend()
            yield i

    try:
        compiled = _compiled(template)
        variables: dict[str, Any] = {
            "messages": _counted(_template_messages(messages), budget),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "range": bounded_range,
        }
        if tools:
            variables["tools"] = _counted([dict(t) for t in tools], budget)
        parts: list[str] = []
        size = 0
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise _Refused(
                    f"the chat template rendered more than {MAX_RENDER_CHARS} characters"
                )
            budget.check_time()
            parts.append(chunk)
        return "".join(parts)
    except InvalidRequestError:
        raise
    except _Refused as exc:
        raise InvalidRequestError(str(exc), param="messages") from None
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidRequestError(
            f"the model's chat template does not parse: {exc.message} (line {exc.lineno})",
            param="messages",
        ) from None
    except jinja2.exceptions.SecurityError as exc:
        raise InvalidRequestError(
            f"the chat template tried an unsafe operation: {exc}", param="messages"
        ) from None
    except RecursionError:
        raise InvalidRequestError("the chat template recursed too deep", param="messages") from None
    except Exception as exc:  # a template error is the request's, whatever Jinja raised
        raise InvalidRequestError(
            f"the chat template failed to render: {type(exc).__name__}: {exc}", param="messages"
        ) from None


def _tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    specs = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return (
        "You can call the following tools. Their JSON schemas:\n<tools>\n"
        + "\n".join(specs)
        + "\n</tools>\nTo call a tool, answer with "
        + TOOL_CALL_OPEN
        + '{"name": <tool name>, "arguments": <arguments as a JSON object>}'
        + TOOL_CALL_CLOSE
        + " (one such block per call) and nothing else."
    )


def _call_text(call: Mapping[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    body = json.dumps(
        {"name": function.get("name", ""), "arguments": arguments}, ensure_ascii=False
    )
    return TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE


def generic_tool_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """Plain ``role``/``content`` messages for a template without tool support: the tools
    as a system prompt, earlier calls and tool results as text, consecutive messages of
    one role merged (templates that insist roles alternate accept the result)."""
    plain: list[dict[str, Any]] = []
    if tools:
        plain.append({"role": "system", "content": _tools_prompt(tools)})
    for m in messages:
        role = m.get("role")
        content = m.get("content") or ""
        if role == "tool":
            role = "user"
            content = f"<tool_response>\n{content}\n</tool_response>"
        calls = m.get("tool_calls") or []
        if calls:
            content = "\n".join([content] * bool(content) + [_call_text(c) for c in calls])
        if plain and plain[-1]["role"] == role:
            plain[-1]["content"] += "\n\n" + content
        else:
            plain.append({"role": role, "content": content})
    return plain
