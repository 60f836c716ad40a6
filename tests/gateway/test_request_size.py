"""How large a /v1 request may be (``LLMHUB_MAX_REQUEST_MB``): a phone photo sent as a base64 image reaches the
provider through both SDKs, a body over the limit is a 413 in its API's error shape naming the limit, with its
ledger row; the rest of the site keeps Django's small limit (``tests/test_handlers.py``)."""

from __future__ import annotations

import base64
import os

import anthropic
import openai
import pytest
from cryptography.fernet import Fernet

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


@pytest.mark.parametrize(("environment", "limit"), [({}, 32 * MIB), ({"LLMHUB_MAX_REQUEST_MB": "5"}, 5 * MIB)])
def test_the_limit_is_read_from_the_environment(environment, limit):
    show = ["shell", "-c", "from django.conf import settings; print(settings.LLMHUB_MAX_REQUEST_BYTES)"]
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
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/chat/completions"]
    assert sent["messages"][0]["content"][1]["image_url"]["url"] == "data:image/jpeg;base64," + data


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
