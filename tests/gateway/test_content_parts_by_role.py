"""Which content parts a message of each role takes, checked once for every provider (chat validation,
``ROLE_CONTENT_PARTS``): OpenAI's spec types a user message's parts as text, image, audio or file, an assistant's as
text or refusal, a system, developer or tool message's as text (llmhub takes a tool message's image too, which
Claude's tool_result takes). Another is a 400 naming the part before admission and any upstream call, with its
rejected row, whichever provider serves the model."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from billing.models import UsageRecord
from providers.models import ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_bad_input import assert_openai_error
from tests.gateway.test_ledger import settle_quietly
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
FILE = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}
REFUSAL = {"type": "refusal", "refusal": "I can't help with that."}
TEXT = {"type": "text", "text": "hello"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{}"}}

# A part the spec does not allow in the role of the message at messages[1], each in a conversation otherwise valid.
REFUSED = {
    "refusal-in-user": [{"role": "user", "content": "hi"}, {"role": "user", "content": [TEXT, REFUSAL]}],
    "refusal-in-system": [{"role": "user", "content": "hi"}, {"role": "system", "content": [TEXT, REFUSAL]}],
    "refusal-in-developer": [{"role": "user", "content": "hi"}, {"role": "developer", "content": [TEXT, REFUSAL]}],
    "refusal-in-tool": [
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": [TEXT, REFUSAL]},
    ],
    "image-in-system": [{"role": "user", "content": "hi"}, {"role": "system", "content": [TEXT, IMAGE]}],
    "audio-in-developer": [{"role": "user", "content": "hi"}, {"role": "developer", "content": [TEXT, AUDIO]}],
    "file-in-tool": [
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": [TEXT, FILE]},
    ],
    "image-in-assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [TEXT, IMAGE]}],
    "audio-in-assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [TEXT, AUDIO]}],
    "file-in-assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [TEXT, FILE]}],
}
# Every kind of provider, each with a model on the fake upstream.
MODELS = {
    "openai-test": (ProviderKind.OPENAI, "/v1", "fake-gpt-4o-mini"),
    "gpt-test": (ProviderKind.OPENAI_COMPATIBLE, "/v1", "fake-gpt-4o-mini"),
    "vllm-test": (ProviderKind.VLLM, "/v1", "fake-gpt-4o-mini"),
    "openrouter-test": (ProviderKind.OPENROUTER, "/v1", "fake-gpt-4o-mini"),
    "azure-test": (ProviderKind.AZURE_OPENAI, "", "fake-gpt-4o-mini"),
    "claude-test": (ProviderKind.ANTHROPIC, "", "fake-claude-haiku"),
    "gemini-test": (ProviderKind.GEMINI, "", "gemini-2.5-flash"),
    "command-test": (ProviderKind.COHERE, "/cohere", "command-a-03-2025"),
    "mistral-test": (ProviderKind.MISTRAL, "/mistral/v1", "mistral-small-latest"),
    "llama-test": (ProviderKind.OLLAMA, "/ollama/v1", "llama3.2"),
}


@pytest.fixture
def every_kind(gateway):
    for name, (kind, path, upstream_id) in MODELS.items():
        if name in ("gpt-test", "claude-test"):
            continue  # the gateway's own catalog has them
        provider = ProviderFactory(
            name=f"{name}-provider",
            kind=kind,
            base_url=gateway.upstream.base_url + path,
            **({"api_version": "2024-10-21"} if kind == ProviderKind.AZURE_OPENAI else {}),
        )
        ModelFactory(name=name, provider=provider, upstream_id=upstream_id, input_per_mtok=Decimal("1"))
    return gateway


def post(gateway, path: str, body: dict) -> httpx.Response:
    return httpx.post(gateway.url + path, json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20)


@pytest.mark.parametrize("model", list(MODELS))
def test_a_part_the_spec_does_not_allow_in_its_role_is_a_400_naming_it_before_any_call(every_kind, model):
    """Until 7 December each went on by the provider's translation: to OpenAI's API (and Azure's) for its own 400,
    to Mistral for its 422, to Ollama for its 400 ``invalid message format``; Claude's translation sent a user's or a
    tool's refusal on as text and an assistant's image as an image block; Gemini's and Cohere's refused some of
    them after admission, naming the part."""
    for case, messages in REFUSED.items():
        response = post(every_kind, "/v1/chat/completions", {"model": model, "messages": messages})
        error = assert_openai_error(response, 400, param="messages[1].content[1].type", code="invalid_value")
        assert repr(messages[1]["content"][1]["type"]) in error["message"], case
        assert f"'{messages[1]['role']}'" in error["message"], case
        record = wait_for_record(response.headers["x-request-id"])
        assert (record.status, record.error_type, record.cost) == ("rejected", "invalid_value", 0), case
    settle_quietly()
    assert UsageRecord.objects.count() == len(REFUSED)
    assert every_kind.upstream.requests_served() == 0


def test_a_refusal_part_in_a_user_item_of_v1_responses_is_a_400_naming_it_before_any_call(every_kind):
    """The Responses API's input had it already: a user item's parts are input text and images alone."""
    item = {"role": "user", "content": [{"type": "input_text", "text": "hi"}, REFUSAL]}
    response = post(every_kind, "/v1/responses", {"model": "gpt-test", "input": [item]})
    assert_openai_error(response, 400, param="input[0].content[1].type", code="unsupported_value")
    assert wait_for_record(response.headers["x-request-id"]).status == "rejected"
    assert every_kind.upstream.requests_served() == 0


# What the spec allows in each role (a user's attachments of every kind, an assistant's refusal beside its text, text
# parts in a system, developer and tool message), and llmhub's own exception, a tool message's image.
ALLOWED = [
    {"role": "system", "content": [TEXT]},
    {"role": "developer", "content": [TEXT, TEXT]},
    {"role": "user", "content": [TEXT, IMAGE, AUDIO, FILE]},
    {"role": "assistant", "content": [TEXT, REFUSAL], "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": [TEXT, IMAGE]},
    {"role": "user", "content": "Why?"},
]


def test_every_part_the_spec_allows_in_each_role_goes_upstream_as_it_came(every_kind):
    response = post(every_kind, "/v1/chat/completions", {"model": "gpt-test", "messages": ALLOWED})
    assert response.status_code == 200, response.text
    assert every_kind.upstream.requests[-1]["body"]["messages"] == ALLOWED


def test_a_tool_messages_image_reaches_claude_as_its_tool_results_image(every_kind):
    """llmhub's exception to the spec's text-only tool message: a screenshot tool's result, which Claude takes."""
    messages = [
        {"role": "user", "content": "Look."},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": [TEXT, IMAGE]},
    ]
    response = post(every_kind, "/v1/chat/completions", {"model": "claude-test", "messages": messages})
    assert response.status_code == 200, response.text
    [result] = every_kind.upstream.requests[-1]["body"]["messages"][-1]["content"]
    assert [block["type"] for block in result["content"]] == ["text", "image"]
