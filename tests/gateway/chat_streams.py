"""A chat completion streamed through the live gateway (``gateway`` of ``conftest.py``) and read as a client got it:
the SSE body's bytes, each ``data:`` payload, the chunks, the request's id and the tool call pieces. For the tests of
what llmhub makes of an upstream's stream, whether the fake upstream's markers shape it (``[[nulls=...]]``,
``[[arguments=object]]``) or it is the bytes a test gives (``raw_directive``): httpx, not the SDK, so that the test
sees the bytes relayed and a stream that ends without ``[DONE]``. And any entry point's stream read as its SSE events
(``sse_events``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from llmhub.testing.openapi import validate_openai_schema

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@dataclass(frozen=True)
class ChatStream:
    raw: bytes
    request_id: str

    @property
    def payloads(self) -> list[bytes]:
        """Each event's ``data:`` payload, ``[DONE]`` included; every event is a ``data:`` line."""
        blocks = [block for block in self.raw.split(b"\n\n") if block]
        assert all(block.startswith(b"data: ") for block in blocks), self.raw
        return [block.removeprefix(b"data: ") for block in blocks]

    @property
    def done(self) -> bool:
        """Whether the stream ended with ``[DONE]`` (a failure after the headers ends it with an error event)."""
        payloads = self.payloads
        return bool(payloads) and payloads[-1] == b"[DONE]"

    @property
    def chunks(self) -> list[Any]:
        """The events but ``[DONE]``, decoded: the chunks, and an error event where the stream failed."""
        return [json.loads(payload) for payload in self.payloads if payload != b"[DONE]"]


def sse_events(
    gateway, path: str, body: dict, headers: dict, *, timeout: float = 30
) -> tuple[httpx.Response, list[tuple[str | None, str]]]:
    """A stream of ``path`` (``body`` with ``stream`` on) as its events came over the wire: (event name, data) each;
    raises if the connection was cut."""
    events: list[tuple[str | None, str]] = []
    name = None
    with httpx.stream(
        "POST", gateway.url + path, json={**body, "stream": True}, headers=headers, timeout=timeout
    ) as reply:
        for line in reply.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, line[6:]))
                name = None
    return reply, events


def chat_stream(gateway, content: str, **extra: Any) -> ChatStream:
    """Stream ``gpt-test``'s answer to the user's ``content`` (``extra``: more of the body) from
    ``/v1/chat/completions``; the answer must be a 200."""
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": content}], "stream": True, **extra}
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    ) as response:
        assert response.status_code == 200, response.read()
        raw = response.read()  # a connection dropped mid-stream raises here
        return ChatStream(raw, response.headers["x-request-id"])


def tool_call_pieces(chunks: list[Any]) -> list[dict[str, Any]]:
    """The tool call pieces of the chunks' first choice, in their order."""
    return [
        call for chunk in chunks if chunk["choices"] for call in chunk["choices"][0]["delta"].get("tool_calls") or ()
    ]


def assert_valid_stream(events: list[Any], done: bool) -> None:
    """Either every chunk valid and a clean end, or valid chunks and then one error event, with no ``[DONE]``."""
    errors = [event for event in events if "error" in event]
    if done:
        assert errors == []
    else:
        assert len(errors) == 1 and events[-1] is errors[0], events
        assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
    for event in events:
        if "error" not in event:
            validate_openai_schema(event, "CreateChatCompletionStreamResponse")
