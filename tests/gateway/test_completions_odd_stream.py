"""What an OpenAI-compatible server streams for a text completion, however odd its chunks (fields left out, null or
of another type, extra fields, usage in every chunk or only at the end), reaches the client as chunks that validate
against OpenAI's spec (``CreateCompletionResponse``, which the spec says streamed chunks share), read by a strict
JSON reader and by the openai SDK's ``completions.create(stream=True)``, then ``[DONE]``, with the request's one ``ok``
row. The stream's whole-reply twin is ``test_completions_odd_upstream.py``.

OpenAI's own chunks say two nulls the schema (the whole reply's) does not allow: a ``finish_reason`` of null until a
choice's last chunk, and ``"usage": null`` on every chunk when the usage was asked for (``test_completions_api.py``).
Those two are taken as OpenAI says them (``schema_valid``); anything else must be the schema's."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import pytest

from billing.models import UsageRecord
from llmhub.testing.fake_upstream import raw_directive
from llmhub.testing.openapi import validate_openai_schema
from tests.gateway.test_logprobs_not_finite import strict
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

USAGE = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
FINISH_REASONS = {"stop", "length", "content_filter"}


def choice(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish, **extra}


def chunk(*choices: Any, **extra: Any) -> dict[str, Any]:
    base = {"id": "cmpl-odd", "object": "text_completion", "created": 1, "model": "fake-gpt-4o-mini"}
    return {**base, "choices": list(choices), **extra}


def without(document: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key not in names}


def stream_of(chunks: list[dict[str, Any]]) -> bytes:
    """The SSE body of ``chunks``, then ``[DONE]``."""
    return b"".join(b"data: " + json.dumps(data).encode() + b"\n\n" for data in chunks) + b"data: [DONE]\n\n"


def plain(*pieces: dict[str, Any], usage: Any = USAGE) -> list[dict[str, Any]]:
    """``one two`` in two text chunks and a finish chunk, then a chunk of ``usage`` alone (none for ``...``); the
    first chunks' choices updated with ``pieces`` in turn, a field given ``...`` left out."""
    chunks = [chunk(choice("one")), chunk(choice(" two")), chunk(choice("", "stop"))]
    for data, extra in zip(chunks, pieces, strict=False):
        item = data["choices"][0]
        item.update(extra)
        for name in [name for name, value in extra.items() if value is ...]:
            del item[name]
    return chunks if usage is ... else [*chunks, chunk(usage=usage)]


def each_choice(change) -> list[dict[str, Any]]:
    """``plain``'s chunks with ``change`` applied to every choice."""
    chunks = plain()
    for data in chunks:
        for item in data["choices"]:
            change(item)
    return chunks


def each_chunk(change) -> list[dict[str, Any]]:
    """``plain``'s chunks with ``change`` applied to every chunk."""
    chunks = plain()
    for data in chunks:
        change(data)
    return chunks


def left_out(*names: str):
    def change(data: dict[str, Any]) -> None:
        for name in names:
            data.pop(name, None)

    return change


def said(**fields: Any):
    def change(data: dict[str, Any]) -> None:
        data.update(fields)

    return change


ODD: dict[str, list[dict[str, Any]]] = {
    "id-created-model-left-out": each_chunk(left_out("id", "created", "model")),
    "object-left-out": each_chunk(left_out("object")),
    "object-null": each_chunk(said(object=None)),
    "created-float": each_chunk(said(created=1.5)),
    "fingerprint-null": each_chunk(said(system_fingerprint=None)),
    "extra-fields": each_chunk(said(kv_transfer_params=None)),
    "choice-extra-fields": each_choice(said(stop_reason=None, matched_stop=None, token_ids=None)),
    "index-left-out": each_choice(left_out("index")),
    "logprobs-left-out": each_choice(left_out("logprobs")),
    "logprobs-lists-null": each_choice(
        said(logprobs={"tokens": None, "token_logprobs": None, "top_logprobs": None, "text_offset": None})
    ),
    "text-null-on-the-finish": [
        chunk(choice("one")),
        chunk(choice(" two")),
        chunk(choice(None, "stop")),
        chunk(usage=USAGE),
    ],
    "text-left-out-on-the-finish": plain({}, {}, {"text": ...}),
    "finish-left-out-midway": plain({"finish_reason": ...}, {"finish_reason": ...}),
    "finish-tool-calls": plain({}, {}, {"finish_reason": "tool_calls"}),
    "finish-eos": plain({}, {}, {"finish_reason": "eos"}),
    "finish-with-the-last-text": [chunk(choice("one")), chunk(choice(" two", "length")), chunk(usage=USAGE)],
    "usage-null-on-the-last": plain(usage=None),
    "usage-partial": plain(usage={"prompt_tokens": 2}),
    "usage-details-null": plain(usage={**USAGE, "completion_tokens_details": None, "prompt_tokens_details": None}),
    "usage-counts-null": plain(usage={"prompt_tokens": 2, "completion_tokens": None, "total_tokens": None}),
    "usage-on-every-chunk": each_chunk(said(usage=USAGE)),
    "usage-with-the-finish": [chunk(choice("one")), chunk(choice(" two")), chunk(choice("", "stop"), usage=USAGE)],
    "usage-left-out": plain(usage=...),
    "choices-null-on-the-usage": [*plain(usage=...), chunk(usage=USAGE) | {"choices": None}],
    "choices-left-out-on-the-usage": [*plain(usage=...), without(chunk(usage=USAGE), "choices")],
}


def schema_valid(data: dict[str, Any]) -> None:
    """``data`` validates against ``CreateCompletionResponse``, OpenAI's own two nulls taken as it says them (the
    module's docstring): a null ``finish_reason`` and a null ``usage``."""
    checked = copy.deepcopy(data)
    if "usage" in checked and checked["usage"] is None:
        del checked["usage"]
    for item in checked.get("choices") or ():
        if isinstance(item, dict) and "finish_reason" in item and item["finish_reason"] is None:
            item["finish_reason"] = "stop"
    validate_openai_schema(checked, "CreateCompletionResponse")


def streamed(gateway, upstream: bytes, **extra: Any) -> tuple[httpx.Response, list[Any], bool]:
    return streamed_body(gateway, {"model": "gpt-test", "prompt": "hi " + raw_directive(upstream), **extra})


def streamed_body(gateway, body: dict[str, Any]) -> tuple[httpx.Response, list[Any], bool]:
    """The stream ``body`` asks for: the response, its chunks (read strictly), whether it ended with ``[DONE]``."""
    body = {**body, "stream": True}
    with httpx.stream(
        "POST",
        gateway.url + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    ) as response:
        raw = response.read()
    blocks = [block for block in raw.split(b"\n\n") if block]
    assert all(block.startswith(b"data: ") for block in blocks), raw
    payloads = [block.removeprefix(b"data: ") for block in blocks]
    done = bool(payloads) and payloads[-1] == b"[DONE]"
    return response, [strict(payload) for payload in payloads if payload != b"[DONE]"], done


@pytest.mark.parametrize("usage_asked", [True, False], ids=["usage-asked", "usage-not-asked"])
@pytest.mark.parametrize("case", list(ODD))
def test_each_relayed_chunk_validates(gateway, case, usage_asked):
    extra = {"stream_options": {"include_usage": True}} if usage_asked else {}
    response, chunks, done = streamed(gateway, stream_of(ODD[case]), **extra)
    assert response.status_code == 200 and done, chunks
    for data in chunks:
        schema_valid(data)
    ids = {(data["id"], data["created"]) for data in chunks}
    assert len(ids) == 1, ids  # one completion: the same id and time on every chunk
    assert {data["model"] for data in chunks} == {"gpt-test"}
    texts = [item for data in chunks for item in data["choices"]]
    assert "".join(item["text"] for item in texts) == "one two"
    assert [item["finish_reason"] for item in texts if item["finish_reason"] is not None] in (["stop"], ["length"])
    assert all(item["finish_reason"] in FINISH_REASONS | {None} for item in texts)
    usages = [data["usage"] for data in chunks if data.get("usage")]
    if usage_asked:
        assert usages and chunks[-1]["usage"] == usages[-1]  # last, with the finish or on its own
    else:
        assert usages == []
    record = wait_for_record(response.headers["x-request-id"])
    assert record.status == "ok" and UsageRecord.objects.filter(request_id=record.request_id).count() == 1


@pytest.mark.parametrize("case", list(ODD))
def test_the_openai_sdk_reads_each_odd_stream(gateway, case):
    chunks = list(
        gateway.client().completions.create(
            model="gpt-test",
            prompt="hi " + raw_directive(stream_of(ODD[case])),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [item for data in chunks for item in data.choices]
    assert "".join(item.text for item in texts) == "one two"
    assert all(item.index == 0 for item in texts)
    assert {data.object for data in chunks} == {"text_completion"} and {data.model for data in chunks} == {"gpt-test"}
    assert chunks[-1].usage.total_tokens > 0


@pytest.mark.parametrize("n", [1, 2])
def test_a_server_that_ignores_stream_is_relayed_as_the_stream_it_would_have_been(gateway, n):
    """vLLM, Ollama and proxies in front of them can answer ``stream: true`` with the whole completion as JSON (the
    fake upstream's ``[[stream=ignored]]``). Before, that was a stream with no chunk: malformed, a 502 after one
    attempt. It is each choice's chunk (its text, logprobs and finish), then the usage, then ``[DONE]``, as chat
    completions relay it (``completion_chunks``)."""
    prompt = "hi [[reply=one two three]] [[stream=ignored]]"
    extra = {"stream_options": {"include_usage": True}, "n": n, "logprobs": 1}
    response, chunks, done = streamed_body(gateway, {"model": "gpt-test", "prompt": prompt, **extra})
    assert response.status_code == 200 and done, chunks
    for data in chunks:
        schema_valid(data)
    choices = [item for data in chunks for item in data["choices"]]
    for index in range(n):
        mine = [item for item in choices if item["index"] == index]
        assert "".join(item["text"] for item in mine) == "one two three"
        assert [item["finish_reason"] for item in mine if item["finish_reason"]] == ["stop"]
    assert all(item["logprobs"]["tokens"] for item in choices if item["text"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3 * n
    record = wait_for_record(response.headers["x-request-id"])
    assert (record.status, record.completion_tokens, record.usage_estimated) == ("ok", 3 * n, False)

    parsed = list(gateway.client().completions.create(model="gpt-test", prompt=prompt, stream=True, max_tokens=16, n=n))
    for index in range(n):
        assert "".join(item.text for data in parsed for item in data.choices if item.index == index) == "one two three"
    assert not any(data.usage for data in parsed)  # not asked for


def test_an_odd_whole_answer_to_a_stream_is_relayed_in_the_schema(gateway):
    """A whole answer of the odd shapes ``test_completions_odd_upstream.py`` pins, sent to a stream request: filled in
    as the whole reply is, then streamed."""
    answer = {"object": "text_completion", "created": 1.5, "choices": [{"text": None, "finish_reason": None}]}
    answer["choices"].append({"text": "one two", "index": 1, "logprobs": {"tokens": None}, "finish_reason": "eos"})
    prompt = "hi " + raw_directive(json.dumps(answer).encode()) + " [[stream=ignored]]"
    body = {"model": "gpt-test", "prompt": prompt, "stream_options": {"include_usage": True}}
    response, chunks, done = streamed_body(gateway, body)
    assert response.status_code == 200 and done, chunks
    for data in chunks:
        schema_valid(data)
    assert len({(data["id"], data["created"]) for data in chunks}) == 1
    assert [item["text"] for data in chunks for item in data["choices"]] == ["", "one two"]
    assert chunks[-1]["usage"]  # the estimate charged: the upstream counted nothing
    assert wait_for_record(response.headers["x-request-id"]).usage_estimated
