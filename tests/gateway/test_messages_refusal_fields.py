"""A /v1/messages request for a model reached through the chat-completions translation, refused by the provider's
adapter before any call (an image it cannot take): the 400, in Anthropic's shape, names the field the client sent
(``messages.2.content.1.source.media_type``), not the translated chat completion's (``messages[3].content[1].
image_url.url``, one more when a system prompt became ``messages[0]``), whole and streamed, with the refusal's
ledger row as before (``translate_anthropic.messages_field``, ``messages_refusal_named``)."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from providers.models import ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

HTML = {"type": "base64", "media_type": "text/html", "data": "PGI+aGk8L2I+"}
REMOTE = {"type": "url", "url": "https://example.com/cat.png"}


@pytest.fixture
def translated(gateway):
    """A Gemini model and an Ollama model, each refusing such images before any call."""
    for name, kind, path, upstream_id in (
        ("gemini-test", ProviderKind.GEMINI, "", "gemini-2.5-flash"),
        ("llama-test", ProviderKind.OLLAMA, "/ollama/v1", "llama3.2"),
    ):
        provider = ProviderFactory(name=f"{name}-provider", kind=kind, base_url=gateway.upstream.base_url + path)
        ModelFactory(name=name, provider=provider, upstream_id=upstream_id, input_per_mtok=Decimal("1"))
    return gateway


def image_turns(source: dict, *, in_tool_result: bool) -> list[dict]:
    """A conversation whose third turn (``messages.2``) holds the image: as its second block, or as the second block
    of its first block, a tool_result."""
    image = {"type": "image", "source": source}
    if not in_tool_result:
        return [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Show me."},
            {"role": "user", "content": [{"type": "text", "text": "This one:"}, image]},
        ]
    return [
        {"role": "user", "content": "Take a screenshot."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "x"}, image]},
                {"type": "text", "text": "What is it?"},
            ],
        },
    ]


def post_messages(gateway, body: dict) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/messages", json=body, headers={"x-api-key": gateway.key}, timeout=20)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("system", [None, "Be brief."], ids=["no-system", "system"])
@pytest.mark.parametrize(
    ("in_tool_result", "field"),
    [(False, "messages.2.content.1.source.media_type"), (True, "messages.2.content.0.content.1.source.media_type")],
    ids=["user-block", "tool-result-block"],
)
@pytest.mark.parametrize("model", ["gemini-test", "llama-test"])
def test_an_image_type_refused_names_the_clients_block(translated, model, in_tool_result, field, system, stream):
    """Before: ``messages[2].content[1].image_url.url`` (``messages[3]`` with the system prompt; ``content[0]``,
    the tool result's image opening the user message, for the tool result's) in the message."""
    body = {"model": model, "max_tokens": 50, "messages": image_turns(HTML, in_tool_result=in_tool_result)}
    if system is not None:
        body["system"] = system
    if stream:
        body["stream"] = True
    served = translated.upstream.requests_served()
    response = post_messages(translated, body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert (error["type"], error["error"]["type"]) == ("error", "invalid_request_error")
    assert error["error"]["message"].startswith(f"`{field}`: "), error
    assert "image_url" not in error["error"]["message"] and "messages[" not in error["error"]["message"]
    record = wait_for_record(response.headers["x-request-id"])
    assert (record.status, record.error_type, record.cost) == ("invalid", "invalid_image_format", 0)
    assert translated.upstream.requests_served() == served


@pytest.mark.parametrize("in_tool_result", [False, True], ids=["user-block", "tool-result-block"])
def test_a_url_image_refused_names_the_sources_url(translated, in_tool_result):
    body = {
        "model": "llama-test",
        "max_tokens": 50,
        "system": "Be brief.",
        "messages": image_turns(REMOTE, in_tool_result=in_tool_result),
    }
    response = post_messages(translated, body)
    assert response.status_code == 400, response.text
    block = "messages.2.content.0.content.1" if in_tool_result else "messages.2.content.1"
    assert response.json()["error"]["message"].startswith(f"`{block}.source.url`: Ollama takes images as base64")
    assert wait_for_record(response.headers["x-request-id"]).error_type == "image_url_not_supported"
