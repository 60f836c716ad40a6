"""How large a /v1 request may be (``LLMHUB_MAX_REQUEST_MB``): a phone photo sent as a base64 image reaches the
provider through both SDKs, a body over the limit is a 413 in its API's error shape naming the limit, with its
ledger row; the rest of the site keeps Django's small limit (``tests/test_handlers.py``). And how much text it may
carry (``LLMHUB_MAX_REQUEST_TEXT_CHARS``): more is OpenAI's 400 ``context_length_exceeded`` (Anthropic's
``invalid_request_error`` on /v1/messages), before moderation reads it, with its ledger row; attachments do not
count."""

from __future__ import annotations

import base64
import os

import anthropic
import openai
import pytest
from cryptography.fernet import Fernet

from chat.validation import request_text_chars
from providers.models import CatalogModel, ModerationChecker, ModerationPolicy, Provider
from providers.moderation import policy_cache
from tests.test_project import clean_env, manage
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

MIB = 2**20


def photo(size: int) -> str:
    """A photo's bytes (random: a JPEG does not compress) as base64, ``size`` characters of it."""
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


def anthropic_client(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=60)


def openai_image_request(data: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + data}}
    return {"model": "gpt-test", "messages": [{"role": "user", "content": [{"type": "text", "text": "What?"}, part]}]}


def anthropic_image_request(data: str) -> dict:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": data}}
    content = [{"type": "text", "text": "What?"}, image]
    return {"model": "claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("setting", "environment", "limit"),
    [
        ("LLMHUB_MAX_REQUEST_BYTES", {}, 32 * MIB),
        ("LLMHUB_MAX_REQUEST_BYTES", {"LLMHUB_MAX_REQUEST_MB": "5"}, 5 * MIB),
        ("LLMHUB_MAX_REQUEST_TEXT_CHARS", {}, 4_000_000),
        ("LLMHUB_MAX_REQUEST_TEXT_CHARS", {"LLMHUB_MAX_REQUEST_TEXT_CHARS": "1000000"}, 1_000_000),
    ],
)
def test_the_limit_is_read_from_the_environment(setting, environment, limit):
    show = ["shell", "-c", f"from django.conf import settings; print(settings.{setting})"]
    key = Fernet.generate_key().decode()
    env = clean_env(DJANGO_SETTINGS_MODULE="llmhub.settings.base", FIELD_ENCRYPTION_KEYS=key, **environment)
    shown = manage(*show, env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip().splitlines()[-1] == str(limit)


def test_a_6_mb_photo_reaches_an_openai_model_through_the_sdk(gateway):
    """Django's 2.5 MB (DATA_UPLOAD_MAX_MEMORY_SIZE) refused it with a 413; OpenAI takes images up to 20 MB."""
    data = photo(6 * MIB)
    completion = gateway.client(timeout=60).chat.completions.create(**openai_image_request(data))
    assert completion.choices[0].message.content
    [entry] = [entry for entry in gateway.upstream.requests if entry["path"] == "/v1/chat/completions"]
    assert entry["body"]["messages"][0]["content"][1]["image_url"]["url"] == "data:image/jpeg;base64," + data
    # Sent in pieces (providers.adapters.aiohttp_client._sent_in_pieces), framed as one body of its length.
    assert int(entry["headers"]["content-length"]) > 6 * MIB and "transfer-encoding" not in entry["headers"]


def test_a_6_mb_photo_reaches_claude_through_the_sdk(gateway):
    data = photo(6 * MIB)
    message = anthropic_client(gateway).messages.create(**anthropic_image_request(data))
    assert message.content[0].text
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/messages"]
    assert sent["messages"][0]["content"][1]["source"]["data"] == data


def test_a_body_over_the_limit_is_an_openai_413_naming_it_with_its_row(gateway, settings):
    settings.LLMHUB_MAX_REQUEST_BYTES = 4 * MIB
    with pytest.raises(openai.APIStatusError) as raised:
        gateway.client(timeout=60).chat.completions.create(**openai_image_request(photo(5 * MIB)))
    response = raised.value.response
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert "4 MB" in error["message"]
    record = wait_for_record(response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "request_too_large"
    assert not [entry for entry in gateway.upstream.requests if entry["path"] == "/v1/chat/completions"]


def test_a_body_over_the_limit_is_an_anthropic_413_on_the_messages_api(gateway, settings):
    settings.LLMHUB_MAX_REQUEST_BYTES = 4 * MIB
    with pytest.raises(anthropic.APIStatusError) as raised:
        anthropic_client(gateway).messages.create(**anthropic_image_request(photo(5 * MIB)))
    response = raised.value.response
    assert response.status_code == 413
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "request_too_large" and "4 MB" in response.json()["error"]["message"]
    record = wait_for_record(response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "request_too_large"


@pytest.fixture
def checked_by_a_moderation_service(gateway):
    """gpt-test and claude-test under a policy that asks the fake upstream's /v1/moderations about every input."""
    policy_cache.invalidate()
    policy = ModerationPolicy.objects.create(
        name="service",
        checker=ModerationChecker.OPENAI,
        moderation_provider=Provider.objects.get(name="fake-openai"),
        moderation_model="omni-moderation-latest",
    )
    CatalogModel.objects.filter(name__in=["gpt-test", "claude-test"]).update(moderation_policy=policy)
    yield
    policy_cache.invalidate()


def upstream_paths(gateway) -> list[str]:
    return [entry["path"] for entry in gateway.upstream.requests]


def test_text_over_the_limit_is_refused_before_moderation_reads_it(gateway, settings, checked_by_a_moderation_service):
    """30 MB of text cost seconds of CPU in the input check (17 s of U+FDFA under a block-list) before anything
    refused it; OpenAI answers an input longer than a model takes with a 400 context_length_exceeded."""
    settings.LLMHUB_MAX_REQUEST_TEXT_CHARS = 1_000
    text = "lorem ipsum " * 100  # 1,200 characters, in two messages
    messages = [{"role": "system", "content": text[:600]}, {"role": "user", "content": text[600:]}]
    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client().chat.completions.create(model="gpt-test", messages=messages)
    response = raised.value.response
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert "at most 1,000 characters of text" in error["message"]
    record = wait_for_record(response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "context_length_exceeded"
    assert record.model_name == "gpt-test"
    assert upstream_paths(gateway) == []  # neither the moderation service nor the model was asked


def test_text_at_the_limit_is_served(gateway, settings, checked_by_a_moderation_service):
    """Every string counts, the names of the body's fields too (a tool's schema is text the model reads)."""
    settings.LLMHUB_MAX_REQUEST_TEXT_CHARS = 1_000 + sum(
        map(len, ["model", "gpt-test", "messages", "role", "user", "content"])
    )
    completion = gateway.client().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x" * 1_000}]
    )
    assert completion.choices[0].message.content
    assert upstream_paths(gateway)[:2] == ["/v1/moderations", "/v1/chat/completions"]


def test_text_in_tools_and_tool_calls_counts(gateway, settings):
    """Every text the model reads is text moderation reads: a tool's description as much as a message."""
    settings.LLMHUB_MAX_REQUEST_TEXT_CHARS = 1_000
    tool = {"type": "function", "function": {"name": "look", "description": "d" * 1_000, "parameters": {}}}
    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], tools=[tool]
        )
    assert raised.value.response.json()["error"]["code"] == "context_length_exceeded"


def test_attachments_do_not_count(gateway, settings, checked_by_a_moderation_service):
    """A photo's base64 is no text to read: a 2 MB image passes a limit of 1,000 characters."""
    settings.LLMHUB_MAX_REQUEST_TEXT_CHARS = 1_000
    data = photo(2 * MIB)
    completion = gateway.client(timeout=60).chat.completions.create(**openai_image_request(data))
    assert completion.choices[0].message.content
    message = anthropic_client(gateway).messages.create(**anthropic_image_request(data))
    assert message.content[0].text


def test_text_over_the_limit_is_an_anthropic_400_on_the_messages_api(
    gateway, settings, checked_by_a_moderation_service
):
    settings.LLMHUB_MAX_REQUEST_TEXT_CHARS = 1_000
    with pytest.raises(anthropic.BadRequestError) as raised:
        anthropic_client(gateway).messages.create(
            model="claude-test",
            max_tokens=20,
            system="s" * 600,
            messages=[{"role": "user", "content": [{"type": "text", "text": "u" * 600}]}],
        )
    response = raised.value.response
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "at most 1,000 characters of text" in response.json()["error"]["message"]
    record = wait_for_record(response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "context_length_exceeded"
    assert upstream_paths(gateway) == []


BYTES = "A" * 10_000  # an attachment's base64, no text
IMAGE_PART = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": BYTES}}


@pytest.mark.parametrize(
    ("content", "counted"),
    [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + BYTES}}], False),
        ([{"type": "input_audio", "input_audio": {"data": BYTES, "format": "wav"}}], False),
        ([{"type": "file", "file": {"file_data": "data:application/pdf;base64," + BYTES}}], False),
        ([IMAGE_PART], False),
        ([{"type": "tool_result", "tool_use_id": "t", "content": [IMAGE_PART]}], False),
        # Text moderation reads and the model takes, whatever shape holds it.
        ([{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": BYTES}}], True),
        ([{"type": "tool_use", "id": "t", "name": "look", "input": {"x": IMAGE_PART}}], True),
        ([{"type": "text", "text": BYTES}], True),
    ],
)
def test_what_counts_as_text(content, counted):
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    assert (request_text_chars(body) >= len(BYTES)) is counted


def test_an_attachment_s_shape_elsewhere_is_text():
    """A tool's schema is read whole by moderation: an image's shape in it is no attachment."""
    tool = {"name": "look", "input_schema": {"type": "object", "examples": [IMAGE_PART]}}
    assert request_text_chars({"model": "m", "messages": [], "tools": [tool]}) > len(BYTES)
    responses_input = [{"role": "user", "content": [{"type": "input_image", "image_url": "data:," + BYTES}]}]
    assert request_text_chars({"model": "m", "input": responses_input}) < 100
