"""Whatever an OpenAI-protocol upstream sends, the request is settled with exactly one ledger row, and the client
gets a valid answer or a clear error in its protocol's shape (a 502 before the first byte, an in-band error after
it, never a clean ``[DONE]`` after a failure).

The fake upstream answers exactly the bytes a test gives it (``[[raw=...]]``), over real HTTP; llmhub is called as
a client would call it (httpx for the raw stream, the official SDK)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from billing.models import UsageRecord, UsageStatus
from llmhub.testing.fake_upstream import raw_directive
from llmhub.testing.openapi import validate_openai_schema
from providers.tokens import text_tokens
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

BASE = {"id": "chatcmpl-odd", "object": "chat.completion.chunk", "created": 1, "model": "fake-gpt-4o-mini"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def chunk(delta: Any = None, finish: Any = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {} if delta is None else delta, "finish_reason": finish}
    return {**BASE, "choices": [choice], **extra}


def usage_chunk(usage: Any = USAGE) -> dict[str, Any]:
    return {**BASE, "choices": [], "usage": usage}


def sse(*events: Any) -> bytes:
    """A stream's body: bytes as they are, a string as a ``data:`` line's text, anything else as its JSON."""
    body = b""
    for event in events:
        if isinstance(event, bytes):
            body += event
        else:
            body += b"data: " + (event if isinstance(event, str) else json.dumps(event)).encode() + b"\n\n"
    return body


def stream_around(odd: Any, *, usage: Any = USAGE) -> bytes:
    """A stream that has begun (its role chunk and a first word), then ``odd``, then finishes as usual."""
    return sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        odd,
        chunk({}, "stop"),
        usage_chunk(usage),
        "[DONE]",
    )


def completion(message: Any = None, **extra: Any) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello there"} if message is None else message,
        "logprobs": None,
        "finish_reason": "stop",
    }
    return {
        "id": "chatcmpl-odd",
        "object": "chat.completion",
        "created": 1,
        "model": "fake-gpt-4o-mini",
        "choices": [choice],
        "usage": USAGE,
        **extra,
    }


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **extra}


def streamed(gateway, body_bytes: bytes) -> tuple[list[Any], bool, UsageRecord]:
    """Stream through llmhub: the events the client got (decoded), whether it ended with ``[DONE]``, the row."""
    body = ask("hi " + raw_directive(body_bytes), stream=True, stream_options={"include_usage": True})
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    ) as response:
        assert response.status_code == 200, response.read()
        raw = response.read()  # a connection dropped mid-stream raises here
        request_id = response.headers["x-request-id"]
    blocks = [block for block in raw.split(b"\n\n") if block]
    assert all(block.startswith(b"data: ") for block in blocks), raw
    payloads = [block.removeprefix(b"data: ") for block in blocks]
    done = payloads[-1] == b"[DONE]"
    events = [json.loads(payload) for payload in payloads if payload != b"[DONE]"]
    return events, done, wait_for_record(request_id)


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


def assert_sane_row(record: UsageRecord) -> None:
    assert record.prompt_tokens >= 0 and record.completion_tokens >= 0
    assert isinstance(record.cost, Decimal) and record.cost >= 0
    assert UsageRecord.objects.filter(request_id=record.request_id).count() == 1


def whole(gateway, answer: Any) -> tuple[httpx.Response, UsageRecord]:
    body = ask("hi " + raw_directive(json.dumps(answer).encode()))
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
    )
    return response, wait_for_record(response.headers["x-request-id"])


# Usage -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2**31, 2**63, 10**30])
def test_a_usage_count_too_large_to_be_true_is_estimated_and_the_row_written(gateway, count):
    """Before: the count went into the row as it came, the database refused it (out of range) and the request had
    no ledger row at all (the writer's batch went to the spool)."""
    huge = {"prompt_tokens": count, "completion_tokens": count, "total_tokens": 2 * count}
    _, done, record = streamed(gateway, stream_around(chunk({"content": " world"}), usage=huge))
    assert done
    assert_sane_row(record)
    assert record.status == UsageStatus.OK
    assert record.usage_estimated and record.completion_tokens == text_tokens("Hello world")
