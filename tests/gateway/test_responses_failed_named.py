"""A /v1/responses stream that fails after it began (an upstream's in-band error after its first chunk) ends with
``response.failed``, whose message names the Responses field the client wrote, as the whole response and a refusal
before the stream do (``chat.pipeline.client_refusal_named``): until 7 December it quoted the chat completion's path
the upstream's error named (``messages[1].content``), a field the client never wrote, one index off after
``instructions``."""

from __future__ import annotations

import json

import pytest

from llmhub.testing.fake_upstream import raw_directive
from tests.gateway.chat_streams import sse_events
from tests.gateway.test_odd_upstream_shapes import chunk, sse
from tests.gateway.test_responses_api import raw_events, validate_event
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)


def failing_after_a_word(error: dict) -> bytes:
    """An upstream's stream that began (its role chunk and a first word), then reports ``error`` in-band."""
    return sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}), {"error": error})


@pytest.mark.parametrize("spelling", ["messages[1].content[0].image_url.url", "messages.[1].content.[0].image_url"])
def test_an_error_after_the_stream_began_names_the_input_item_in_response_failed(gateway, spelling):
    error = {
        "message": f"Invalid '{spelling}': the image could not be downloaded.",
        "type": "invalid_request_error",
        "param": spelling,
        "code": "invalid_image_url",
    }
    text = "What is it? " + raw_directive(failing_after_a_word(error))
    body = {"model": "gpt-test", "instructions": "Be brief.", "input": [{"role": "user", "content": text}]}
    reply, events = raw_events(gateway, body)
    assert reply.status_code == 200
    for _, event in events:
        validate_event(event)
    kinds = [event["type"] for _, event in events]
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.failed"
    failed = events[-1][1]["response"]["error"]
    # Before: "... Invalid 'messages[1].content[0].image_url.url': ...", a field of the chat completion.
    assert "messages" not in failed["message"], failed
    assert "Invalid 'input[0].content': the image could not be downloaded." in failed["message"], failed
    assert failed["code"] == "server_error"
    record = wait_for_record(reply.headers["x-request-id"])
    assert (record.status, record.operation) == ("upstream_error", "responses")
    assert json.dumps(events).count("messages[") == 0


def test_an_error_after_a_messages_stream_began_names_the_messages_field(gateway):
    """/v1/messages, translated for an OpenAI-protocol model, the same: its ``error`` event's message names the
    Messages request's field (``messages.0.content.0``), not the chat completion's it was sent as."""
    error = {
        "message": "Invalid 'messages[1].content[0].image_url.url': the image could not be downloaded.",
        "type": "invalid_request_error",
        "param": "messages[1].content[0].image_url.url",
        "code": "invalid_image_url",
    }
    text = "What is it? " + raw_directive(failing_after_a_word(error))
    body = {
        "model": "gpt-test",
        "max_tokens": 50,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
    }
    headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    reply, events = sse_events(gateway, "/v1/messages", body, headers)
    assert reply.status_code == 200
    name, data = events[-1]
    assert name == "error", events
    message = json.loads(data)["error"]["message"]
    # Before: "... Invalid 'messages[1].content[0].image_url.url': ...", a field of the chat completion.
    assert "Invalid 'messages.0.content.0': the image could not be downloaded." in message, message
    assert "messages[" not in message
