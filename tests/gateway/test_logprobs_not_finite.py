"""A logprob JSON has not (``NaN``, ``Infinity``, ``-Infinity``: vLLM's ``-Infinity`` for a token it could not have
chosen), which Python's JSON reads and would write back as it came, reaches no client as one: every entry point that
answers logprobs (chat completions, text completions, the Responses API; whole and streamed) answers JSON a strict
reader takes and that validates against OpenAI's spec, whose logprobs are numbers, never null: ``NaN`` and
``-Infinity`` are OpenAI's own floor, ``-9999.0`` (a token very unlikely), ``Infinity`` ``0.0`` (the most a log
probability is). Until 7 December a chat completion's ``NaN`` and ``Infinity`` were null (which the spec and the openai
SDK's types refuse), a text completion's were relayed as they came, and so was ``-Infinity``."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from llmhub.testing.openapi import validate_openai_schema
from tests.gateway.test_responses_api import LOGPROBS, validate_event

pytestmark = pytest.mark.django_db(transaction=True)

# What each number JSON has not is answered as.
FINITE = {"NaN": -9999.0, "-Infinity": -9999.0, "Infinity": 0.0}


def strict(text: str | bytes) -> Any:
    """JSON as a strict reader (JavaScript's, Go's) reads it: no NaN, no infinities."""

    def refused(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refused)


def posted(gateway, path: str, body: dict) -> Any:
    response = httpx.post(gateway.url + path, json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20)
    assert response.status_code == 200, response.text
    return strict(response.text)


def streamed(gateway, path: str, body: dict) -> list[Any]:
    """Each ``data:`` payload but ``[DONE]``, read strictly."""
    with httpx.stream(
        "POST",
        gateway.url + path,
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    ) as response:
        assert response.status_code == 200, response.read()
        raw = response.read()
    lines = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    return [strict(line) for line in lines if line != b"[DONE]"]


def chat_logprobs(choice_logprobs: dict) -> list[float]:
    return [
        value
        for token in choice_logprobs["content"]
        for value in (token["logprob"], *(top["logprob"] for top in token["top_logprobs"]))
    ]


@pytest.mark.parametrize("said", list(FINITE))
def test_a_chat_completion_answers_a_finite_logprob(gateway, said):
    body = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": f"[[reply=one two]] [[logprob={said}]]"}],
        "logprobs": True,
        "top_logprobs": 2,
    }
    reply = posted(gateway, "/v1/chat/completions", body)
    validate_openai_schema(reply, "CreateChatCompletionResponse")
    assert set(chat_logprobs(reply["choices"][0]["logprobs"])) == {FINITE[said]}

    chunks = streamed(gateway, "/v1/chat/completions", body)
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    values = [
        value
        for chunk in chunks
        for choice in chunk["choices"]
        if choice.get("logprobs")
        for value in chat_logprobs(choice["logprobs"])
    ]
    assert values and set(values) == {FINITE[said]}


def text_logprobs(logprobs: dict | None) -> list[float]:
    logprobs = logprobs or {}
    steps = logprobs.get("top_logprobs") or []
    return [*(logprobs.get("token_logprobs") or []), *(value for step in steps for value in step.values())]


@pytest.mark.parametrize("said", list(FINITE))
def test_a_text_completion_answers_a_finite_logprob(gateway, said):
    body = {"model": "gpt-test", "prompt": f"[[reply=one two]] [[logprob={said}]]", "logprobs": 2}
    reply = posted(gateway, "/v1/completions", body)
    validate_openai_schema(reply, "CreateCompletionResponse")
    assert set(text_logprobs(reply["choices"][0]["logprobs"])) == {FINITE[said]}

    chunks = streamed(gateway, "/v1/completions", body)
    values = [value for chunk in chunks for choice in chunk["choices"] for value in text_logprobs(choice["logprobs"])]
    for chunk in chunks:
        if chunk["choices"] and chunk["choices"][0]["finish_reason"] is not None:
            validate_openai_schema({k: v for k, v in chunk.items() if v is not None}, "CreateCompletionResponse")
    assert values and set(values) == {FINITE[said]}


def responses_logprobs(logprobs: list[dict]) -> list[float]:
    return [value for token in logprobs for value in (token["logprob"], *(t["logprob"] for t in token["top_logprobs"]))]


@pytest.mark.parametrize("said", list(FINITE))
def test_a_response_answers_a_finite_logprob(gateway, said):
    body = {"model": "gpt-test", "input": f"[[reply=one two]] [[logprob={said}]]", "include": [LOGPROBS]}
    body["top_logprobs"] = 2
    reply = posted(gateway, "/v1/responses", body)
    validate_openai_schema(reply, "Response")
    [part] = reply["output"][0]["content"]
    assert set(responses_logprobs(part["logprobs"])) == {FINITE[said]}

    events = streamed(gateway, "/v1/responses", body)
    for event in events:
        validate_event(event)
    [done] = [event for event in events if event["type"] == "response.output_text.done"]
    assert set(responses_logprobs(done["logprobs"])) == {FINITE[said]}
