"""The Anthropic Messages API's request and response bodies, as pydantic models.

Field names are the wire names. Requests ignore fields they do not know (an
agent sends betas, ``cache_control`` markers and the like: the cache needs no
hints) and refuse wrong types with a 400 in Anthropic's envelope. The tests
check the responses against the official ``anthropic`` client's types.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CountTokensRequest",
    "CountTokensResponse",
    "MessageOut",
    "MessagesRequest",
    "UsageOut",
]

MAX_STOPS = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- requests


class TextBlock(_Request):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, object]


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False


class ThinkingBlock(_Request):
    """Earlier reasoning an agent sends back: dropped (the model never saw it as text)."""

    type: Literal["thinking", "redacted_thinking"]


class MediaBlock(_Request):
    """Accepted by the schema so that the refusal can name it (the models take text only)."""

    type: Literal["image", "document", "search_result"]


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | MediaBlock,
    Field(discriminator="type"),
]


class MessageIn(_Request):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolIn(_Request):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str | None = None
    input_schema: dict[str, object]
    type: Literal["custom"] | None = None


class ToolChoiceIn(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Metadata(_Request):
    user_id: str | None = None


class CountTokensRequest(_Request):
    model: str
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[ToolIn], Field(max_length=128)] | None = None
    tool_choice: ToolChoiceIn | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOPS - 1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: Metadata | None = None
    stream: bool = False


# ---------------------------------------------------------------------- responses


class TextOut(_Response):
    type: Literal["text"] = "text"
    text: str


class ToolUseOut(_Response):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, object]


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class UsageOut(_Response):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    service_tier: Literal["standard"] = "standard"


class MessageOut(_Response):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextOut | ToolUseOut]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: UsageOut


class CountTokensResponse(_Response):
    input_tokens: int


class ErrorDetail(_Response):
    type: str
    message: str


class ErrorResponse(_Response):
    type: Literal["error"] = "error"
    error: ErrorDetail
    request_id: str | None = None
