"""An image part's data URL of a type OpenAI does not read (its vision guide: PNG, JPEG, WEBP and non-animated GIF;
Azure OpenAI's alike), for a model served by OpenAI's own API or Azure OpenAI: a 400 ``invalid_image_format`` naming
``messages[N].content[M].image_url.url`` before any call, as Gemini's, Claude's and Ollama's adapters refuse one
(``common.images_checked``, ``OPENAI_IMAGE_URLS``), where it went up for the provider's own 400 after the call. The
generic OpenAI-compatible kinds (vLLM and the like) send it on: what their models read is their own servers'."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from providers.models import ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_bad_input import assert_openai_error
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

# Every OpenAI-protocol kind of the catalog but Ollama (its own rule: test_ollama_gateway.py) and Mistral.
KINDS = {
    "openai-test": (ProviderKind.OPENAI, "/v1"),
    "azure-test": (ProviderKind.AZURE_OPENAI, ""),
    "vllm-test": (ProviderKind.VLLM, "/v1"),
    "compatible-test": (ProviderKind.OPENAI_COMPATIBLE, "/v1"),
}
CHECKED = ("openai-test", "azure-test")
REFUSED = {
    "html": ("data:text/html;base64,PGI+aGk8L2I+", "text/html"),
    "pdf": ("data:application/pdf;base64,JVBERi0=", "application/pdf"),
    "heic": ("data:image/heic;base64,AAAAGGZ0eXA=", "image/heic"),
    "svg": ("data:image/svg+xml;base64,PHN2Zy8+", "image/svg+xml"),
}
TAKEN = [
    "data:image/png;base64,iVBORw0KGgo=",
    "data:image/jpeg;base64,/9j/4AAQ",
    "data:IMAGE/JPEG;base64,/9j/4AAQ",
    "data:image/jpg;base64,/9j/4AAQ",
    "data:image/gif;base64,R0lGODlhAQABAAAAACw=",
    "data:image/webp;base64,UklGRg==",
    "https://example.com/cat.png",
]


@pytest.fixture
def kinds(gateway):
    for name, (kind, path) in KINDS.items():
        provider = ProviderFactory(
            name=f"{name}-provider",
            kind=kind,
            base_url=gateway.upstream.base_url + path,
            **({"api_version": "2024-10-21"} if kind == ProviderKind.AZURE_OPENAI else {}),
        )
        ModelFactory(name=name, provider=provider, upstream_id="fake-gpt-4o-mini", input_per_mtok=Decimal("1"))
    return gateway


def with_image(url: str) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": url}}
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]},
    ]


def post(gateway, path: str, body: dict, **headers: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {gateway.key}", **headers}
    return httpx.post(gateway.url + path, json=body, headers=headers, timeout=20)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", CHECKED)
def test_an_image_type_openai_does_not_read_is_a_400_naming_it_before_any_call(kinds, model, stream):
    """Before: each went up as it came (the fake upstream answered 200; OpenAI and Azure answer their own 400)."""
    for case, (url, declared) in REFUSED.items():
        served = kinds.upstream.requests_served()
        body = {"model": model, "messages": with_image(url), "stream": stream}
        response = post(kinds, "/v1/chat/completions", body)
        error = assert_openai_error(
            response, 400, param="messages[1].content[1].image_url.url", code="invalid_image_format"
        )
        assert declared in error["message"] and "image/png, image/jpeg, image/gif, image/webp" in error["message"]
        record = wait_for_record(response.headers["x-request-id"])
        assert (record.status, record.error_type, record.cost) == ("invalid", "invalid_image_format", 0), case
        assert kinds.upstream.requests_served() == served, case


@pytest.mark.parametrize("model", list(KINDS))
def test_an_image_openai_reads_goes_up_as_it_came(kinds, model):
    for url in TAKEN:
        response = post(kinds, "/v1/chat/completions", {"model": model, "messages": with_image(url)})
        assert response.status_code == 200, response.text
        assert kinds.upstream.requests[-1]["body"]["messages"][1]["content"][1]["image_url"]["url"] == url


@pytest.mark.parametrize("model", ["vllm-test", "compatible-test"])
def test_a_generic_openai_compatible_server_is_sent_any_image_type(kinds, model):
    """What a vLLM (or any OpenAI-compatible) server's model reads is its own processor's: left to it."""
    for url, _declared in REFUSED.values():
        response = post(kinds, "/v1/chat/completions", {"model": model, "messages": with_image(url)})
        assert response.status_code == 200, response.text
        assert kinds.upstream.requests[-1]["body"]["messages"][1]["content"][1]["image_url"]["url"] == url


def test_through_v1_messages_the_refusal_names_the_image_blocks_media_type(kinds):
    source = {"type": "base64", "media_type": "text/html", "data": "PGI+aGk8L2I+"}
    body = {
        "model": "openai-test",
        "max_tokens": 50,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image", "source": source}]}
        ],
    }
    served = kinds.upstream.requests_served()
    response = post(kinds, "/v1/messages", body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith("`messages.0.content.1.source.media_type`: ")
    assert kinds.upstream.requests_served() == served


def test_through_v1_responses_the_refusal_names_the_input_image(kinds):
    image = {"type": "input_image", "image_url": "data:text/html;base64,PGI+aGk8L2I+"}
    body = {
        "model": "azure-test",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}, image]}],
    }
    served = kinds.upstream.requests_served()
    response = post(kinds, "/v1/responses", body)
    error = assert_openai_error(response, 400, code="invalid_image_format")
    assert error["param"].startswith("input[0].content"), error  # the item's content, as the translation names it
    assert kinds.upstream.requests_served() == served
