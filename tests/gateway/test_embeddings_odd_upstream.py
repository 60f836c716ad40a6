"""What an OpenAI-compatible server answers an embeddings request with, however odd (a field left out or null, a
number JSON has not, a vector that is none), reaches the client as a ``CreateEmbeddingResponse`` that validates
against OpenAI's spec and that a strict JSON reader takes, or as a 502 (a malformed reply: the next deployment); never
out of the spec. Until 7 December a vector holding a NaN or an infinity (no JSON), null, left out, a text or a list
holding a null was relayed as it came, with a 200 (``openai._vector_of_numbers``)."""

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

USAGE = {"prompt_tokens": 2, "total_tokens": 2}


def answer(*items: Any, **extra: Any) -> dict[str, Any]:
    return {"object": "list", "model": "fake-embedding-small", "data": list(items), "usage": USAGE, **extra}


def item(vector: Any = (0.5, -0.25), **extra: Any) -> dict[str, Any]:
    embedding = list(vector) if isinstance(vector, tuple) else vector
    return {"object": "embedding", "index": 0, "embedding": embedding, **extra}


def embedded(embedder, upstream_bytes: bytes) -> httpx.Response:
    body = {"model": "embed-test", "input": "hi " + raw_directive(upstream_bytes), "encoding_format": "float"}
    return httpx.post(
        embedder.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {embedder.key}"}, timeout=20
    )


ODD = {
    "usage-null": answer(item(), usage=None),
    "usage-left-out": {key: value for key, value in answer(item()).items() if key != "usage"},
    "model-left-out": {key: value for key, value in answer(item()).items() if key != "model"},
    "object-left-out": answer({key: value for key, value in item().items() if key != "object"}),
    "extra-fields": answer(item(norm=1.0), id="emb-1", created=1),
    "total-left-out": answer(item(), usage={"prompt_tokens": 2}),
    "object-null": answer(item(object=None), object=None),
}


@pytest.mark.parametrize("case", list(ODD))
def test_an_odd_reply_validates(embedder, case):
    response = embedded(embedder, json.dumps(ODD[case]).encode())
    assert response.status_code == 200, response.text
    validate_openai_schema(strict(response.text), "CreateEmbeddingResponse")
    record = wait_for_record(response.headers["x-request-id"])
    assert record.status == "ok"


NOT_VECTORS = {
    "nan": json.dumps(answer(item((0.5, 0.0)))).encode().replace(b"0.0]", b"NaN]"),
    "infinity": json.dumps(answer(item((0.5, 0.0)))).encode().replace(b"0.0]", b"-Infinity]"),
    "null": json.dumps(answer(item(None))).encode(),
    "left-out": json.dumps(answer({"object": "embedding", "index": 0})).encode(),
    "text": json.dumps(answer(item("abc"))).encode(),
    "null-in-it": json.dumps(answer(item([0.5, None]))).encode(),
}


@pytest.mark.parametrize("case", list(NOT_VECTORS))
def test_a_vector_that_is_none_is_a_502_not_relayed(embedder, case):
    response = embedded(embedder, NOT_VECTORS[case])
    assert response.status_code == 502, response.text
    error = strict(response.text)["error"]
    assert "embedding" in error["message"]
    record = wait_for_record(response.headers["x-request-id"])
    assert record.status == "upstream_error"
