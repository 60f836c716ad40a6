"""Whatever an OpenAI-protocol upstream sends, the request is settled with exactly one ledger row, and the client
gets a valid answer or a clear error in its protocol's shape (a 502 before the first byte, an in-band error after
it, never a clean ``[DONE]`` after a failure).

The fake upstream answers exactly the bytes a test gives it (``[[raw=...]]``), over real HTTP; llmhub is called as
a client would call it (httpx for the raw stream, the official SDK)."""

from __future__ import annotations

import copy
import json
import time
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from billing.models import UsageRecord, UsageStatus
from llmhub.testing.fake_upstream import raw_directive
from llmhub.testing.openapi import validate_openai_schema
from providers.tokens import text_tokens
from tests.gateway.chat_streams import WEATHER_TOOL, assert_valid_stream, chat_stream, tool_call_pieces
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
    """Stream ``body_bytes`` through llmhub: the events the client got (decoded), whether it ended with ``[DONE]``,
    the row."""
    stream = chat_stream(gateway, "hi " + raw_directive(body_bytes), stream_options={"include_usage": True})
    return stream.chunks, stream.done, wait_for_record(stream.request_id)


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


# Fields of types no fill can mend ---------------------------------------------------------------------------------

MALFORMED_DELTAS = {
    "content an object": {"content": {"text": "x"}},
    "content a number": {"content": 5},
    "content a list of other parts": {"content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    "tool_calls not a list": {"tool_calls": "x"},
    "a tool call not an object": {"tool_calls": ["x"]},
    "a tool call's function a string": {"tool_calls": [{"index": 0, "function": "f"}]},
    # A number or a bool is no call's arguments (an object's or an array's are spelt as their text: below).
    "a tool call's arguments a number": {"tool_calls": [{"index": 0, "id": "c", "function": {"arguments": 5}}]},
    "a tool call's arguments a bool": {"tool_calls": [{"index": 0, "id": "c", "function": {"arguments": True}}]},
    "function_call a string": {"function_call": "f"},
    "a tool call's index a list": {
        "tool_calls": [{"index": [0], "id": "c", "function": {"name": "f", "arguments": ""}}]
    },
    "a tool call's index text": {"tool_calls": [{"index": "0", "id": "c", "function": {"name": "f", "arguments": ""}}]},
}
# A number or an object; and Mistral's "error", a generation that failed, which must not end as a clean stop.
MALFORMED_FINISHES = {"a number": 5, "an object": {"type": "stop"}, "error": "error"}


@pytest.mark.parametrize("finish", MALFORMED_FINISHES.values(), ids=MALFORMED_FINISHES)
def test_a_finish_reason_that_is_not_text_is_a_malformed_reply(gateway, finish):
    """Before: relayed as it came (a chunk and a reply OpenAI's schema refuses), and recorded as answered."""
    events, done, record = streamed(gateway, stream_around(chunk({}, finish)))
    assert not done
    assert_valid_stream(events, done)
    assert (record.status, record.error_type) == (UsageStatus.UPSTREAM_ERROR, "upstream_stream_interrupted")

    answer = completion()
    answer["choices"][0]["finish_reason"] = finish
    response, record = whole(gateway, answer)
    assert response.status_code == 502
    assert_sane_row(record)
    assert record.status == UsageStatus.UPSTREAM_ERROR


# Finish reasons other servers spell their own way (vLLM and TGI's eos, Mistral's model_length, an Anthropic-minded
# proxy's end_turn, max_tokens and tool_use), and one nobody spells: each as OpenAI's own reason would be.
FOREIGN_FINISHES = {
    "eos": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_length": "length",
    "tool_use": "tool_calls",
    "something_new": "stop",
}


@pytest.mark.parametrize(("finish", "meant"), FOREIGN_FINISHES.items(), ids=FOREIGN_FINISHES)
def test_a_finish_reason_openai_does_not_spell_becomes_the_one_it_means(gateway, finish, meant):
    """Before: relayed as it came, so every chunk or reply carrying it failed OpenAI's schema (its finish_reason is
    an enum) and typed clients could not read it."""
    body = sse(
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}), chunk({}, finish), usage_chunk()
    )
    events, done, record = streamed(gateway, body + b"data: [DONE]\n\n")
    assert done
    assert_valid_stream(events, done)
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == [meant]
    assert record.status == UsageStatus.OK

    answer = completion()
    answer["choices"][0]["finish_reason"] = finish
    response, record = whole(gateway, answer)
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    assert response.json()["choices"][0]["finish_reason"] == meant
    assert record.status == UsageStatus.OK


@pytest.mark.parametrize("delta", MALFORMED_DELTAS.values(), ids=MALFORMED_DELTAS)
def test_a_chunk_of_the_wrong_types_mid_stream_ends_it_in_band_and_is_billed(gateway, delta):
    """Before: the relay raised a TypeError or an AttributeError on it: the connection dropped with neither an
    error nor ``[DONE]``, and a content that was not text left the request with no ledger row at all."""
    events, done, record = streamed(gateway, stream_around(chunk(delta)))
    assert not done
    assert_valid_stream(events, done)
    assert events[-1]["error"]["code"] == "upstream_stream_interrupted"
    assert "malformed" in events[-1]["error"]["message"]
    assert_sane_row(record)
    assert (record.status, record.error_type) == (UsageStatus.UPSTREAM_ERROR, "upstream_stream_interrupted")
    assert record.usage_estimated and record.completion_tokens == text_tokens("Hello")


def test_a_choice_that_is_not_an_object_mid_stream_ends_it_in_band(gateway):
    events, done, record = streamed(gateway, stream_around({**BASE, "choices": ["x"]}))
    assert not done
    assert_valid_stream(events, done)
    assert_sane_row(record)
    assert record.error_type == "upstream_stream_interrupted"


def test_a_content_of_text_parts_is_relayed_as_its_text(gateway):
    parts = [{"type": "text", "text": " wide"}, {"type": "text", "text": " world"}]
    events, done, record = streamed(gateway, stream_around(chunk({"content": parts})))
    assert done
    assert_valid_stream(events, done)
    texts = [event["choices"][0]["delta"].get("content") for event in events if event["choices"]]
    assert "".join(text for text in texts if text) == "Hello wide world"
    assert (record.status, record.prompt_tokens, record.completion_tokens) == (UsageStatus.OK, 5, 2)

    response, record = whole(gateway, completion({"role": "assistant", "content": parts}))
    assert response.status_code == 200
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    assert response.json()["choices"][0]["message"]["content"] == " wide world"


MALFORMED_MESSAGES = {
    "content an object": {"role": "assistant", "content": {"text": "x"}},
    "content a number": {"role": "assistant", "content": 5},
    "tool_calls not a list": {"role": "assistant", "content": None, "tool_calls": "x"},
    "a tool call not an object": {"role": "assistant", "content": None, "tool_calls": ["x"]},
    "a tool call without its function": {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
    "a tool call's function null": {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": None}],
    },
    "a tool call's arguments a number": {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": 5}}],
    },
    "a function call's arguments a bool": {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "f", "arguments": False},
    },
}


# A call's arguments as a JSON object (Hugging Face TGI, llama.cpp's --tool-args-object) or an array: their JSON text.
OBJECT_ARGUMENTS = {"an object": {"a": 1, "b": ["é", None]}, "an array": [1, {"x": "y"}], "an empty object": {}}


@pytest.mark.parametrize("arguments", OBJECT_ARGUMENTS.values(), ids=OBJECT_ARGUMENTS)
def test_a_tool_calls_arguments_sent_as_json_are_relayed_as_their_text(gateway, arguments):
    """Before: a 502 for a whole reply, the stream ended in band at the piece (a function that is not an object
    with a text name and arguments)."""
    text = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    answer = completion({"role": "assistant", "content": None, "tool_calls": [call]})
    response, record = whole(gateway, answer)
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    assert response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == text
    assert record.status == UsageStatus.OK

    body = sse(
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "f"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
        chunk({}, "tool_calls"),
        usage_chunk(),
        "[DONE]",
    )
    events, done, record = streamed(gateway, body)
    assert done
    assert_valid_stream(events, done)
    pieces = tool_call_pieces(events)
    assert "".join(piece["function"].get("arguments", "") for piece in pieces) == text
    assert record.status == UsageStatus.OK


def test_a_streamed_arguments_object_json_cannot_write_exactly_ends_the_stream_in_band(gateway):
    """A number too large for a float (read as an infinity) has no exact JSON text: refused, not written as null."""
    piece = (
        b'data: {"id":"chatcmpl-odd","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    )
    piece += b'"delta":{"tool_calls":[{"index":0,"function":{"arguments":{"a":1e999}}}]},"finish_reason":null}]}\n\n'
    events, done, record = streamed(gateway, stream_around(piece))
    assert not done
    assert_valid_stream(events, done)
    assert record.error_type == "upstream_stream_interrupted"


@pytest.mark.parametrize("message", MALFORMED_MESSAGES.values(), ids=MALFORMED_MESSAGES)
def test_a_whole_reply_of_the_wrong_types_is_a_502_and_billed_nothing(gateway, message):
    """Before: a 200 whose body OpenAI's schema refuses (a choice that was a string: a 500 and no ledger row)."""
    response, record = whole(gateway, completion(message))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert_sane_row(record)
    assert (record.status, record.cost) == (UsageStatus.UPSTREAM_ERROR, 0)


def test_a_whole_reply_whose_choice_is_not_an_object_is_a_502(gateway):
    response, record = whole(gateway, completion(choices=["x"]))
    assert response.status_code == 502
    assert_sane_row(record)
    assert record.status == UsageStatus.UPSTREAM_ERROR


UNUSABLE_USAGES = {
    "negative": {"prompt_tokens": -5, "completion_tokens": -2, "total_tokens": -7},
    "strings": {"prompt_tokens": "5", "completion_tokens": "2", "total_tokens": "7"},
    "floats": {"prompt_tokens": 5.5, "completion_tokens": 2.5, "total_tokens": 8.0},
    "nulls": {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
    "too large": {"prompt_tokens": 2**63, "completion_tokens": 2**63, "total_tokens": 2**64},
}


@pytest.mark.parametrize("usage", UNUSABLE_USAGES.values(), ids=UNUSABLE_USAGES)
def test_a_whole_reply_whose_usage_counts_nothing_usable_is_estimated(gateway, usage):
    """Before: the reply was answered and charged nothing (0 tokens, not flagged as an estimate)."""
    response, record = whole(gateway, completion(usage=usage))
    assert response.status_code == 200
    assert_sane_row(record)
    assert record.status == UsageStatus.OK
    assert record.usage_estimated and record.completion_tokens == text_tokens("Hello there")
    assert record.prompt_tokens > 0 and record.cost > 0
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")  # what it was charged, as OpenAI's
    assert response.json()["usage"]["completion_tokens"] == record.completion_tokens


STREAMED_UNUSABLE_USAGES = {**UNUSABLE_USAGES, "empty": {}, "no counts": {"total_tokens": 7}}


@pytest.mark.parametrize("usage", STREAMED_UNUSABLE_USAGES.values(), ids=STREAMED_UNUSABLE_USAGES)
def test_a_streamed_usage_that_counts_nothing_usable_is_replaced_by_the_estimate(gateway, usage):
    """Before: the client got the upstream's usage chunk as it came, which OpenAI's schema refuses, while the
    request was charged an estimate; and an empty usage was filled in with zeros and charged as counted: nothing."""
    events, done, record = streamed(gateway, stream_around(chunk({"content": " world"}), usage=usage))
    assert done
    assert_valid_stream(events, done)
    assert_sane_row(record)
    assert record.usage_estimated and record.completion_tokens == text_tokens("Hello world")
    assert record.cost > 0
    reported = [event["usage"] for event in events if event.get("usage")]
    assert reported == [
        {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens,
        }
    ]


# Errors in a 200 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [{"message": "The model is overloaded", "code": 502}, "The model is overloaded"])
def test_an_error_in_a_whole_replys_200_is_a_502_that_says_it(gateway, error):
    """Before: a 200 with an empty reply (no choices), recorded as answered."""
    response, record = whole(gateway, {"error": error})
    assert response.status_code == 502
    body = response.json()["error"]
    assert body["code"] == "upstream_error" and "The model is overloaded" in body["message"]
    assert_sane_row(record)
    assert (record.status, record.cost) == (UsageStatus.UPSTREAM_ERROR, 0)


def test_an_error_in_a_streams_200_ends_it_in_band(gateway):
    """Already right: OpenRouter's and vLLM's in-band error after the stream began."""
    events, done, record = streamed(gateway, stream_around({"error": {"message": "The model is overloaded"}}))
    assert not done
    assert_valid_stream(events, done)
    assert "The model is overloaded" in events[-1]["error"]["message"]
    assert (record.status, record.error_type) == (UsageStatus.UPSTREAM_ERROR, "upstream_stream_interrupted")


@pytest.mark.parametrize(
    "event",
    [
        b'event: error\ndata: {"message": "The model is overloaded"}\n\n',
        b'event: error\ndata: {"error": {"message": "The model is overloaded"}}\n\n',
        b"event: error\ndata: The model is overloaded\n\n",
    ],
)
def test_an_sse_error_event_mid_stream_ends_it_in_band_with_the_providers_message(gateway, event):
    """Before: the event's data was taken for a chunk (filled in as an empty one and relayed, or a malformed chunk)
    and the provider's message was lost; where the stream went on, it ended cleanly."""
    events, done, record = streamed(gateway, stream_around(event))
    assert not done
    assert_valid_stream(events, done)
    assert "The model is overloaded" in events[-1]["error"]["message"]
    assert [event for event in events if "error" not in event and not event["choices"]] == []
    assert (record.status, record.error_type) == (UsageStatus.UPSTREAM_ERROR, "upstream_stream_interrupted")


def test_an_sse_event_of_another_type_is_read_as_a_chunk(gateway):
    """Already right: an `event:` line names the event, whose data is still a chunk."""
    events, done, record = streamed(
        gateway, stream_around(b"event: message\ndata: " + json.dumps(chunk({"content": "!"})).encode() + b"\n\n")
    )
    assert done
    assert_valid_stream(events, done)
    assert record.status == UsageStatus.OK


# Replies with nothing to answer -------------------------------------------------------------------------------------

NO_CHOICES = {"choices empty": [], "choices null": None, "choices an object": {"index": 0}, "choices missing": ...}


@pytest.mark.parametrize("choices", NO_CHOICES.values(), ids=NO_CHOICES)
def test_a_whole_reply_without_choices_is_a_malformed_reply(gateway, choices):
    """Before: a 200 with an empty answer (``"choices": []``), recorded as answered."""
    answer = completion()
    if choices is ...:
        del answer["choices"]
    else:
        answer["choices"] = choices
    response, record = whole(gateway, answer)
    assert response.status_code == 502, response.text
    body = response.json()["error"]
    assert body["code"] == "upstream_error" and "something other than a chat completion" in body["message"]
    assert_sane_row(record)
    assert (record.status, record.cost) == (UsageStatus.UPSTREAM_ERROR, 0)


def test_a_whole_replys_custom_tool_call_is_relayed(gateway):
    """Already right, and kept so: a custom tool's call has no ``function``, and is no malformed reply."""
    call = {"id": "call_1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin Patch"}}
    response, record = whole(gateway, completion({"role": "assistant", "content": None, "tool_calls": [call]}))
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    assert response.json()["choices"][0]["message"]["tool_calls"] == [call]
    assert record.status == UsageStatus.OK


# Usage details ------------------------------------------------------------------------------------------------------

ODD_DETAILS = {
    "prompt_tokens_details": {"cached_tokens": "3", "audio_tokens": -1, "image_tokens": None, "text_tokens": "x"},
    "completion_tokens_details": {"reasoning_tokens": 1.5, "audio_tokens": "2.5", "accepted_prediction_tokens": 2.0},
}
# What is left of them: the integers a string or a float spelt, the rest dropped.
READ_DETAILS = {
    "prompt_tokens_details": {"cached_tokens": 3},
    "completion_tokens_details": {"accepted_prediction_tokens": 2},
}


@pytest.mark.parametrize(
    ("details", "read"),
    [
        (ODD_DETAILS, READ_DETAILS),
        ({"prompt_tokens_details": "3", "completion_tokens_details": [1]}, {}),
        ({"prompt_tokens_details": None, "completion_tokens_details": None}, {}),
    ],
    ids=["counts of other types", "details of other types", "details null"],
)
def test_usage_details_of_other_types_are_read_as_integers_or_dropped(gateway, details, read):
    """Before: relayed as they came, which OpenAI's schema refuses (its details' counts are integers), and a cached
    count spelt as a string was not billed as cached."""
    usage = {**USAGE, **details}
    response, record = whole(gateway, completion(usage=usage))
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    assert response.json()["usage"] == {**USAGE, **read}
    assert (record.prompt_tokens, record.completion_tokens, record.usage_estimated) == (5, 2, False)
    assert record.cached_tokens == read.get("prompt_tokens_details", {}).get("cached_tokens", 0)

    events, done, record = streamed(gateway, stream_around(chunk({"content": " world"}), usage=usage))
    assert done
    assert_valid_stream(events, done)
    assert [event["usage"] for event in events if event.get("usage")] == [{**USAGE, **read}]
    assert (record.prompt_tokens, record.completion_tokens, record.usage_estimated) == (5, 2, False)
    assert record.cached_tokens == read.get("prompt_tokens_details", {}).get("cached_tokens", 0)


# Usage with one count missing ---------------------------------------------------------------------------------------

HALF_USAGES = {
    "completion missing": {"prompt_tokens": 5},
    "completion missing, total given": {"prompt_tokens": 5, "total_tokens": 5},
    "prompt missing": {"completion_tokens": 2},
    "prompt null": {"prompt_tokens": None, "completion_tokens": 2, "total_tokens": 2},
}


def _charged_usage(record: UsageRecord) -> dict[str, int]:
    prompt, completion = record.prompt_tokens, record.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@pytest.mark.parametrize("usage", HALF_USAGES.values(), ids=HALF_USAGES)
def test_a_usage_with_one_count_missing_has_it_estimated_and_flagged(gateway, usage):
    """Before: the missing count was billed 0 (a reply charged no completion, or no prompt) and not flagged as an
    estimate; the client read that 0 in its usage."""
    given = {name: count for name, count in usage.items() if type(count) is int and name != "total_tokens"}

    response, record = whole(gateway, completion(usage=dict(usage)))
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    assert_sane_row(record)
    assert record.usage_estimated
    assert record.completion_tokens == given.get("completion_tokens", text_tokens("Hello there"))
    assert record.prompt_tokens == given.get("prompt_tokens", record.prompt_tokens) and record.prompt_tokens > 0
    assert response.json()["usage"] == _charged_usage(record)

    events, done, record = streamed(gateway, stream_around(chunk({"content": " world"}), usage=dict(usage)))
    assert done
    assert_valid_stream(events, done)
    assert_sane_row(record)
    assert record.usage_estimated
    assert record.completion_tokens == given.get("completion_tokens", text_tokens("Hello world"))
    assert record.prompt_tokens == given.get("prompt_tokens", record.prompt_tokens) and record.prompt_tokens > 0
    assert [event["usage"] for event in events if event.get("usage")] == [_charged_usage(record)]


# Numbers Python's JSON reads and JSON has not ---------------------------------------------------------------------

ODD_CREATED = {"NaN": b"NaN", "Infinity": b"Infinity", "-Infinity": b"-Infinity", "1e300": b"1e300", "-1.5": b"-1.5"}


@pytest.mark.parametrize("created", ODD_CREATED.values(), ids=ODD_CREATED)
def test_a_created_that_is_no_time_is_the_time_of_the_answer(gateway, created):
    """Before: NaN or an infinity (which Python's JSON reads) made the whole reply a 500 with no ledger row, and a
    stream's chunk a malformed one; a float out of range became a made-up integer of 300 digits."""
    before = int(time.time())
    answer = json.dumps(completion(created=0)).encode().replace(b'"created": 0', b'"created": ' + created)
    body = ask("hi " + raw_directive(answer))
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
    )
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    assert before <= response.json()["created"] <= time.time()
    record = wait_for_record(response.headers["x-request-id"])
    assert_sane_row(record)
    assert record.status == UsageStatus.OK

    # The stream's first chunk, whose time every later chunk repeats.
    first = json.dumps(chunk({"role": "assistant", "content": ""}, created=0)).encode()
    first = first.replace(b'"created": 0', b'"created": ' + created)
    rest = sse(chunk({"content": "Hello"}), chunk({}, "stop"), usage_chunk(), "[DONE]")
    events, done, record = streamed(gateway, b"data: " + first + b"\n\n" + rest)
    assert done
    assert_valid_stream(events, done)
    assert record.status == UsageStatus.OK


def _strict(text: str | bytes) -> Any:
    """JSON as a strict reader (JavaScript's, Go's) reads it: no NaN, no infinities."""

    def refused(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refused)


def test_a_number_json_has_not_is_relayed_as_one_json_has(gateway):
    """Before: a logprob of -Infinity or NaN (vLLM's, for a token it could not have chosen) was relayed as it came,
    which is no JSON: a strict client (JavaScript's JSON.parse, Go's) could not read the reply or the chunk.
    -Infinity is now OpenAI's own floor for a logprob (-9999.0), NaN and Infinity elsewhere null; a logprob NaN is the
    floor too (since 7 December: until then null, which the spec's number refuses; ``test_logprobs_not_finite.py``)."""
    answer = completion(logprobs=0)
    answer["choices"][0]["logprobs"] = {
        "content": [{"token": "Hello", "logprob": 0, "bytes": [72], "top_logprobs": []}],
        "refusal": None,
    }
    spelt = (
        json.dumps(answer)
        .encode()
        .replace(b'"logprob": 0', b'"logprob": -Infinity')
        .replace(b'"logprobs": 0', b'"x": NaN')
    )
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=ask("hi " + raw_directive(spelt)),
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    )
    assert response.status_code == 200, response.text
    reply = _strict(response.text)
    assert reply["choices"][0]["logprobs"]["content"][0]["logprob"] == -9999.0 and reply["x"] is None
    validate_openai_schema(reply, "CreateChatCompletionResponse")

    odd = chunk({"content": " world"})
    odd["choices"][0]["logprobs"] = {"content": [{"token": " world", "logprob": 0, "bytes": [32], "top_logprobs": []}]}
    spelt = json.dumps(odd).encode().replace(b'"logprob": 0', b'"logprob": NaN')
    raw = chat_stream(gateway, "hi " + raw_directive(stream_around(b"data: " + spelt + b"\n\n"))).raw
    events = [_strict(block[6:]) for block in raw.split(b"\n\n") if block.startswith(b"data: {")]
    assert [e["choices"][0]["logprobs"] for e in events if e["choices"] and "logprobs" in e["choices"][0]] == [
        {"content": [{"token": " world", "logprob": -9999.0, "bytes": [32], "top_logprobs": []}]}
    ]
    assert raw.endswith(b"data: [DONE]\n\n")


# Fields nobody of ours reads, of values OpenAI's schema does not allow ----------------------------------------------

ODD_METADATA = {
    "a service tier of the server's own": ({"service_tier": "on_demand"}, {}),
    "a service tier a number": ({"service_tier": 5}, {}),
    "a known service tier": ({"service_tier": "flex"}, {"service_tier": "flex"}),
    "a system fingerprint a number": ({"system_fingerprint": 5}, {}),
    "a system fingerprint null": ({"system_fingerprint": None}, {}),
    "a system fingerprint": ({"system_fingerprint": "fp_1"}, {"system_fingerprint": "fp_1"}),
}


@pytest.mark.parametrize(("odd", "kept"), ODD_METADATA.values(), ids=ODD_METADATA)
def test_metadata_openai_does_not_allow_is_left_out(gateway, odd, kept):
    """Before: relayed as it came (Groq's service_tier ``on_demand`` among them), a reply and chunks OpenAI's schema
    refuses, which a typed client may fail to read."""
    response, record = whole(gateway, completion(**odd))
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    assert {name: response.json()[name] for name in odd if name in response.json()} == kept

    events, done, record = streamed(gateway, stream_around(chunk({"content": " world"}, **odd)))
    assert done
    assert_valid_stream(events, done)
    assert record.status == UsageStatus.OK


ODD_CHOICE_FIELDS = {
    "a message's role another": ({"role": "model", "content": "Hello there"}, None),
    "a message's role a number": ({"role": 5, "content": "Hello there"}, None),
    "logprobs a number": ({"role": "assistant", "content": "Hello there"}, 5),
    "logprobs a list": ({"role": "assistant", "content": "Hello there"}, []),
}


@pytest.mark.parametrize(("message", "logprobs"), ODD_CHOICE_FIELDS.values(), ids=ODD_CHOICE_FIELDS)
def test_a_choices_role_or_logprobs_openai_does_not_allow_is_its_own(gateway, message, logprobs):
    """Before: relayed as it came; a reply's message's role is now assistant (the schema's constant), a delta's
    role of no one is left out, and logprobs that are not an object are null."""
    answer = completion(message)
    answer["choices"][0]["logprobs"] = logprobs
    response, _ = whole(gateway, answer)
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    choice = response.json()["choices"][0]
    assert (choice["message"]["role"], choice["message"]["content"]) == ("assistant", "Hello there")

    odd = chunk({"role": message["role"], "content": " world"})
    odd["choices"][0]["logprobs"] = logprobs
    events, done, _ = streamed(gateway, stream_around(odd))
    assert done
    assert_valid_stream(events, done)
    texts = [event["choices"][0]["delta"].get("content") for event in events if event["choices"]]
    assert "".join(text for text in texts if text) == "Hello world"


# vLLM's whole reply as its server sends it (``JSONResponse(content=response.model_dump())``): every field of its
# ``ChatMessage`` and ``ChatCompletionResponse`` left unset is there as null.
VLLM_MESSAGE = {
    "role": "assistant",
    "content": "Hello there",
    "refusal": None,
    "annotations": None,
    "audio": None,
    "function_call": None,
    "tool_calls": [],
    "reasoning_content": None,
}


def test_a_vllm_whole_reply_with_its_nulls_is_relayed_in_openais_schema(gateway):
    """Before: its ``"annotations": null`` was relayed as it came, which OpenAI's schema types as an array (as it does
    ``tool_calls`` and ``function_call``, whose nulls 3ca9470 left out), so a client validating against the spec (or a
    typed SDK) got every reply of a vLLM deployment out of schema; it is left out, as OpenAI leaves it out."""
    answer = completion(dict(VLLM_MESSAGE), service_tier=None, system_fingerprint=None, prompt_logprobs=None)
    answer["choices"][0]["stop_reason"] = None
    response, record = whole(gateway, answer)
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    message = response.json()["choices"][0]["message"]
    assert "annotations" not in message
    assert message["content"] == "Hello there"
    assert record.status == UsageStatus.OK


# A token's log probabilities as servers send them in a whole reply: vLLM's ``ChatCompletionLogProbs``, llama.cpp's
# and SGLang's carry ``content`` alone (OpenAI's schema requires ``refusal`` beside it, null for none); a server that
# skips what it has none of leaves out a token's ``bytes`` (required, nullable), or its ``top_logprobs`` when none were
# asked (required, an empty list), or says null for them.
_TOKEN = {"token": "Hello", "logprob": -0.25, "bytes": [72, 101, 108, 108, 111]}
SERVERS_LOGPROBS = {
    "vLLM, llama.cpp, SGLang: no refusal": {"content": [{**_TOKEN, "top_logprobs": [dict(_TOKEN)]}]},
    "a token without bytes": {
        "content": [{"token": "Hello", "logprob": -0.25, "top_logprobs": [{"token": "Hello", "logprob": -0.25}]}]
    },
    "no top_logprobs asked, left out": {"content": [dict(_TOKEN)], "refusal": None},
    "no top_logprobs asked, null": {"content": [{**_TOKEN, "top_logprobs": None}]},
}


@pytest.mark.parametrize("logprobs", SERVERS_LOGPROBS.values(), ids=SERVERS_LOGPROBS)
def test_a_whole_replys_logprobs_as_servers_send_them_are_relayed_in_openais_schema(gateway, logprobs):
    """Before: relayed as they came, so every whole reply of a vLLM deployment to a request for ``logprobs`` was out of
    OpenAI's schema (its logprobs had no ``refusal``), and a typed client failed to read it; what is required and left
    out is null (``refusal``, a token's ``bytes``) or an empty list (``top_logprobs``), the tokens as they came."""
    answer = completion(dict(VLLM_MESSAGE), service_tier=None, system_fingerprint=None)
    answer["choices"][0]["logprobs"] = copy.deepcopy(logprobs)
    response, record = whole(gateway, answer)
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    relayed = response.json()["choices"][0]["logprobs"]
    assert relayed["refusal"] == logprobs.get("refusal")
    [token] = relayed["content"]
    assert (token["token"], token["logprob"]) == ("Hello", -0.25)
    assert token["bytes"] == logprobs["content"][0].get("bytes")
    assert [(top["token"], top["logprob"]) for top in token["top_logprobs"]] == [
        (top["token"], top["logprob"]) for top in logprobs["content"][0].get("top_logprobs") or ()
    ]
    assert record.status == UsageStatus.OK and not record.usage_estimated


@pytest.mark.parametrize("refusal", [5, {"text": "no"}], ids=["a number", "an object"])
def test_a_refusal_that_is_not_text_is_a_malformed_reply(gateway, refusal):
    """Before: relayed as it came, a reply OpenAI's schema refuses, shown by no client."""
    response, record = whole(gateway, completion({"role": "assistant", "content": None, "refusal": refusal}))
    assert response.status_code == 502
    assert_sane_row(record)
    assert record.status == UsageStatus.UPSTREAM_ERROR

    events, done, record = streamed(gateway, stream_around(chunk({"refusal": refusal})))
    assert not done
    assert_valid_stream(events, done)
    assert record.error_type == "upstream_stream_interrupted"


ODD_CALL_FIELDS = {"an id a number": {"id": 5, "type": "function"}, "a type a number": {"id": "call_1", "type": 5}}


@pytest.mark.parametrize("odd", ODD_CALL_FIELDS.values(), ids=ODD_CALL_FIELDS)
def test_a_tool_calls_id_or_type_that_is_not_text_is_its_own(gateway, odd):
    """Before: relayed as it came, a reply or chunk OpenAI's schema refuses; a whole reply's call now has an id
    and the type function, a streamed one leaves the odd field out."""
    function = {"name": "lookup", "arguments": '{"q": 1}'}
    answer = completion({"role": "assistant", "content": None, "tool_calls": [{**odd, "function": function}]})
    answer["choices"][0]["finish_reason"] = "tool_calls"
    response, _ = whole(gateway, answer)
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    [call] = response.json()["choices"][0]["message"]["tool_calls"]
    assert (call["type"], call["function"]) == ("function", function) and type(call["id"]) is str

    body = sse(
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [{"index": 0, **odd, "function": {"name": "lookup", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": 1}'}}]}),
        chunk({}, "tool_calls"),
        usage_chunk(),
        "[DONE]",
    )
    events, done, record = streamed(gateway, body)
    assert done
    assert_valid_stream(events, done)
    assert record.status == UsageStatus.OK


# A stream request answered with one whole reply ---------------------------------------------------------------------


def sdk_streamed(gateway, text: str, **extra: Any) -> tuple[list[dict[str, Any]], list[Any], UsageRecord]:
    """Stream through the openai SDK: each chunk's JSON as the client got it (to ``[DONE]``, which must come), the
    SDK's own chunks read from the same lines, and the request's row."""
    client = gateway.client()
    with client.chat.completions.with_streaming_response.create(
        model="gpt-test", messages=[{"role": "user", "content": text}], stream=True, **extra
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
        request_id = response.headers["x-request-id"]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert_valid_stream(events, done=True)
    parsed = [openai.types.chat.ChatCompletionChunk.model_validate(event) for event in events]
    return events, parsed, wait_for_record(request_id)


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage asked", "usage not asked"])
def test_a_stream_answered_with_one_whole_reply_is_relayed_as_a_stream(gateway, include_usage):
    """Some servers (vLLM, Ollama, proxies in front of them) ignore ``stream: true`` and answer the whole
    chat.completion as JSON. Before: taken for a stream with no chunk, malformed: a 502 (or the next deployment).
    Now the reply is relayed as the stream the client asked for (its role, its text, its finish, the usage chunk
    when asked, ``[DONE]``), priced from the reply's usage, one row."""
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    events, parsed, record = sdk_streamed(gateway, "hi [[words=12]] [[stream=ignored]]", **options)

    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({event["id"] for event in events}) == 1 and {event["model"] for event in events} == {"gpt-test"}
    text = "".join(chunk.choices[0].delta.content or "" for chunk in parsed if chunk.choices)
    assert len(text.split()) == 12
    assert [c.finish_reason for chunk in parsed for c in chunk.choices if c.finish_reason] == ["stop"]
    if include_usage:
        assert parsed[-1].choices == [] and parsed[-1].usage.completion_tokens == 12
        assert parsed[-1].usage.prompt_tokens == record.prompt_tokens
    else:
        assert all(chunk.usage is None for chunk in parsed)
    assert (record.status, record.completion_tokens, record.usage_estimated) == (UsageStatus.OK, 12, False)
    assert_sane_row(record)
    assert record.cost > 0


def test_a_stream_answered_with_one_whole_tool_call_relays_the_call(gateway):
    _, parsed, record = sdk_streamed(
        gateway, "weather in Paris [[stream=ignored]]", tools=[WEATHER_TOOL], stream_options={"include_usage": True}
    )

    calls = [call for chunk in parsed if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
    assert [(call.index, call.type, call.function.name) for call in calls] == [(0, "function", "get_weather")]
    assert calls[0].id and json.loads(calls[0].function.arguments) == {"city": "weather in Paris"}
    assert [c.finish_reason for chunk in parsed for c in chunk.choices if c.finish_reason] == ["tool_calls"]
    assert parsed[-1].usage is not None and parsed[-1].usage.completion_tokens == record.completion_tokens
    assert record.status == UsageStatus.OK and not record.usage_estimated


def test_a_stream_answered_with_one_whole_reply_of_several_choices_relays_each(gateway):
    _, parsed, record = sdk_streamed(gateway, "hi [[words=3]] [[stream=ignored]]", n=2)

    for index in (0, 1):
        text = "".join(c.delta.content or "" for chunk in parsed for c in chunk.choices if c.index == index)
        assert len(text.split()) == 3
    assert sorted(c.index for chunk in parsed for c in chunk.choices if c.finish_reason) == [0, 1]
    assert record.status == UsageStatus.OK and record.completion_tokens == 6


# What a stream request answered with JSON may hold that is no chat completion: it stays malformed.
NOT_COMPLETIONS = {
    "no choices": b'{"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": []}',
    "not JSON": b"<html>Bad gateway</html>",
    "a list": b"[1, 2]",
    "a content of the wrong type": json.dumps(completion({"role": "assistant", "content": 5})).encode(),
}


@pytest.mark.parametrize("answer", NOT_COMPLETIONS.values(), ids=NOT_COMPLETIONS)
def test_a_stream_answered_with_json_that_is_no_completion_is_a_malformed_reply(gateway, answer):
    with pytest.raises(openai.APIStatusError) as excinfo:
        gateway.client().chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi " + raw_directive(answer) + " [[stream=ignored]]"}],
            stream=True,
        )
    assert excinfo.value.status_code == 502
    assert excinfo.value.response.headers["x-llmhub-attempts"] == "1"
    record = wait_for_record(excinfo.value.response.headers["x-request-id"])
    assert record.status == UsageStatus.UPSTREAM_ERROR
    assert_sane_row(record)


# Embeddings ---------------------------------------------------------------------------------------------------------


def embeddings(**changes: Any) -> dict[str, Any]:
    """vLLM's reply (``EmbeddingResponse``, every field as its server dumps it), with ``changes`` (None: left out)."""
    reply: dict[str, Any] = {
        "id": "embd-1",
        "object": "list",
        "created": 1,
        "model": "fake-embedding-small",
        "data": [{"index": 0, "object": "embedding", "embedding": [0.6, 0.8]}],
        "usage": {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0, "prompt_tokens_details": None},
    }
    for name, value in changes.items():
        holder, _, key = name.rpartition(".")
        target = reply["data"][0] if holder == "data" else reply[holder] if holder else reply
        if value is LEFT_OUT:
            del target[key]
        else:
            target[key] = value
    return reply


LEFT_OUT = object()
ODD_EMBEDDINGS = {
    "vLLM's": {},
    "object null": {"object": None},
    "object left out": {"object": LEFT_OUT},
    "an item's object null": {"data.object": None},
    "an item's object left out": {"data.object": LEFT_OUT},
    "usage's total null": {"usage.total_tokens": None},
    "usage's total left out": {"usage.total_tokens": LEFT_OUT},
    "usage null": {"usage": None},
    "usage's prompt null": {"usage.prompt_tokens": None},
    "model null": {"model": None},
}


@pytest.mark.parametrize("changes", ODD_EMBEDDINGS.values(), ids=ODD_EMBEDDINGS)
def test_embeddings_as_servers_send_them_are_relayed_in_openais_schema(embedder, changes):
    """Before: a list's or an embedding's ``object`` said null (or an embedding's left out), and a usage's
    ``total_tokens`` null or left out, were relayed so, out of OpenAI's schema (only a list's ``object`` left out was
    filled in); the constants are filled in, and the total is the prompt's count. The row charges what the upstream
    counted, or, when it counted no prompt, the estimate it says it is, which the client's usage then says."""
    answer = embeddings(**changes)
    response = httpx.post(
        embedder.url + "/v1/embeddings",
        json={"model": "embed-test", "input": "three words here " + raw_directive(json.dumps(answer).encode())},
        headers={"Authorization": f"Bearer {embedder.key}"},
        timeout=20,
    )
    record = wait_for_record(response.headers["x-request-id"])
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateEmbeddingResponse")
    assert response.json()["data"][0]["embedding"] == [0.6, 0.8]
    assert record.status == UsageStatus.OK
    counted = answer["usage"] is not None and answer["usage"]["prompt_tokens"] is not None
    assert record.usage_estimated is not counted
    assert record.prompt_tokens == (3 if counted else record.prompt_tokens) and record.prompt_tokens > 0
    usage = response.json()["usage"]
    assert (usage["prompt_tokens"], usage["total_tokens"]) == (record.prompt_tokens, record.prompt_tokens)


# vLLM's ``UsageInfo.completion_tokens`` is optional: a null count is none given, not zero tokens -------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_whole_replys_null_completion_count_is_estimated_and_the_row_says_so(gateway, path):
    """A reply of text with ``"completion_tokens": null`` (vLLM's usage, which types it optional) is charged the
    estimate of that text, flagged as estimated, and the client's usage says what was charged: never 0 tokens."""
    usage = {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": None, "prompt_tokens_details": None}
    if path == "/v1/completions":
        choice = {"index": 0, "text": "Hello there", "logprobs": None, "finish_reason": "stop", "stop_reason": None}
        answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
        body: dict[str, Any] = {
            "model": "gpt-test",
            "prompt": raw_directive(json.dumps({**answer, "usage": usage}).encode()),
        }
        schema = "CreateCompletionResponse"
    else:
        body = ask("hi " + raw_directive(json.dumps(completion(dict(VLLM_MESSAGE), usage=usage)).encode()))
        schema = "CreateChatCompletionResponse"
    response = httpx.post(gateway.url + path, json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20)
    record = wait_for_record(response.headers["x-request-id"])
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), schema)
    assert_sane_row(record)
    assert record.usage_estimated
    assert (record.prompt_tokens, record.completion_tokens) == (5, text_tokens("Hello there"))
    assert response.json()["usage"] == _charged_usage(record)


# A reply the provider completed with nothing in it, and no usage: the provider billed its prompt ------------------


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_reply_without_usage_is_charged_its_prompt_estimated(gateway, stream):
    """A server that reports no usage answering an empty reply (``content: ""``, ``finish_reason: stop``) billed the
    prompt; before, the row charged 0 tokens and cost nothing, and on a key with a budget such replies were free."""
    empty = completion({"role": "assistant", "content": ""})
    del empty["usage"]
    if stream:
        chunks = sse(chunk({"role": "assistant", "content": ""}), chunk({}, "stop"), "[DONE]")
        _, done, record = streamed(gateway, chunks)
        assert done
    else:
        response, record = whole(gateway, empty)
        assert response.status_code == 200, response.text
        validate_openai_schema(response.json(), "CreateChatCompletionResponse")
        assert response.json()["usage"] == _charged_usage(record)
    assert_sane_row(record)
    assert record.status == UsageStatus.OK
    assert record.usage_estimated
    assert record.prompt_tokens > 0 and record.completion_tokens == 0
    assert record.cost > 0
