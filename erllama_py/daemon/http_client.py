"""A small HTTP client of the daemon's OpenAI-compatible API (the standard library's
urllib: the CLI needs no HTTP dependency of its own)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

__all__ = ["HttpClientError", "get_json", "post_json", "stream_events"]

TIMEOUT_S = 600.0


class HttpClientError(Exception):
    """The daemon is unreachable or answered with an error (the message is one line);
    `status` is the HTTP status of an error answer, None when there was none."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _request(url: str, body: object | None, api_key: str | None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    return urllib.request.Request(url, data=data, headers=headers)


def _open(request: urllib.request.Request, timeout: float) -> Any:
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace")
        try:
            message = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = detail.strip()[:300] or exc.reason
        raise HttpClientError(f"HTTP {exc.code}: {message}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HttpClientError(f"cannot reach {request.full_url}: {reason}") from None


def get_json(url: str, api_key: str | None = None, timeout: float = TIMEOUT_S) -> Any:
    """GET `url` and parse its JSON body."""
    with _open(_request(url, None, api_key), timeout) as response:
        return json.loads(response.read())


def post_json(url: str, body: object, api_key: str | None = None) -> Any:
    """POST `body` as JSON and parse the JSON answer."""
    with _open(_request(url, body, api_key), TIMEOUT_S) as response:
        return json.loads(response.read())


def stream_events(url: str, body: object, api_key: str | None = None) -> Iterator[Any]:
    """POST `body` and yield each server-sent event's JSON data until ``[DONE]``."""
    with _open(_request(url, body, api_key), TIMEOUT_S) as response:
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                return
            event = json.loads(data)
            if isinstance(event, dict) and "error" in event:
                raise HttpClientError(str(event["error"].get("message", event["error"])))
            yield event
