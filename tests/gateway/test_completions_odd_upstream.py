"""What an OpenAI-compatible server answers a text completion with, however odd (fields left out, null or of another
type, extra fields), reaches the client as a ``CreateCompletionResponse`` that validates against
OpenAI's spec and that a strict JSON reader takes (``openai_shape.TextCompletionShape``). All read right before
(7 December's conformance review): kept as guards. A stream's chunks are OpenAI's own out of the schema (a null
``finish_reason`` and usage, ``test_completions_api.py``); a reply with no choices is a 502, ``test_completions_api.py``
too."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from llmhub.testing.fake_upstream import raw_directive
from llmhub.testing.openapi import validate_openai_schema
from tests.gateway.test_logprobs_not_finite import strict
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

USAGE = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def choice(**extra: Any) -> dict[str, Any]:
    return {"text": "one two", "index": 0, "logprobs": None, "finish_reason": "stop", **extra}


def answer(*choices: Any, **extra: Any) -> dict[str, Any]:
    base = {"id": "cmpl-odd", "object": "text_completion", "created": 1, "model": "fake-gpt-4o-mini"}
    return {**base, "choices": list(choices) or [choice()], "usage": USAGE, **extra}


def without(document: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key not in names}


def completed(gateway, upstream_bytes: bytes, **extra: Any) -> httpx.Response:
    body = {"model": "gpt-test", "prompt": "hi " + raw_directive(upstream_bytes), **extra}
    return httpx.post(
        gateway.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
    )


ODD = {
    "usage-null": answer(usage=None),
    "usage-left-out": without(answer(), "usage"),
    "usage-partial": answer(usage={"prompt_tokens": 2}),
    "usage-details-null": answer(usage={**USAGE, "completion_tokens_details": None, "prompt_tokens_details": None}),
    "id-created-model-left-out": without(answer(), "id", "created", "model"),
    "object-left-out": without(answer(), "object"),
    "created-float": answer(created=1.5),
    "fingerprint-null": answer(system_fingerprint=None),
    "extra-fields": answer(choice(stop_reason=None, matched_stop=2), kv_transfer_params=None),
    "logprobs-left-out": answer(without(choice(), "logprobs")),
    "logprobs-lists-null": answer(
        choice(logprobs={"tokens": None, "token_logprobs": None, "top_logprobs": None, "text_offset": None})
    ),
    "text-null": answer(choice(text=None)),
    "finish-null": answer(choice(finish_reason=None)),
    "finish-tool-calls": answer(choice(finish_reason="tool_calls")),
    "index-left-out": answer(without(choice(), "index")),
}


@pytest.mark.parametrize("case", list(ODD))
def test_an_odd_reply_validates(gateway, case):
    response = completed(gateway, json.dumps(ODD[case]).encode())
    assert response.status_code == 200, response.text
    validate_openai_schema(strict(response.text), "CreateCompletionResponse")
    record = wait_for_record(response.headers["x-request-id"])
    assert record.status == "ok"
