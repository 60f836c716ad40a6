"""Admission reserves an attachment at the most its provider may bill it (``providers.tokens``: an image by the size its
header declares, a PDF by its pages), so that one request cannot take a key past its budget by its own excess. Until
7 December every attachment was reserved as 1,600 tokens: a 2048² image to gpt-4o-mini (25,501 tokens) or a 40-page
PDF to Claude (about 94,000) was admitted on a budget it then overspent. Through the live gateway against the fake
upstream, whose reply (``[[raw=...]]``) reports what the provider would bill; settlement charges it as before."""

from __future__ import annotations

import json
from base64 import b64encode
from decimal import Decimal

import anthropic
import openai
import pytest

from billing.models import UsageRecord
from billing.services.budgets import api_key_limits_set
from llmhub.testing.fake_upstream import raw_directive
from tests.attachments import data_url, pdf, png
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

IMAGE = data_url(png(2048, 2048), "image/png")
IMAGE_PROMPT_TOKENS = 25_531  # what gpt-4o-mini bills: 2,833 + 4 tiles × 5,667, and the text
# gpt-4o-mini's whole reply, reporting that prompt: $0.15/M × 25,531 + $0.60/M × 4 = $0.00383205.
IMAGE_REPLY = {
    "id": "chatcmpl-image",
    "object": "chat.completion",
    "created": 1,
    "model": "fake-gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "A black square."},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": IMAGE_PROMPT_TOKENS, "completion_tokens": 4, "total_tokens": IMAGE_PROMPT_TOKENS + 4},
}
IMAGE_COST = Decimal("0.0038320500")
PDF_PAGES = 40
PDF_PROMPT_TOKENS = PDF_PAGES * 2_347  # a page of text as Claude counts it, with its image
# Claude's whole reply, reporting that prompt: $0.80/M × 93,880 + $4/M × 2 = $0.075112.
PDF_REPLY = {
    "id": "msg_pdf",
    "type": "message",
    "role": "assistant",
    "model": "fake-claude-haiku",
    "content": [{"type": "text", "text": "Forty pages."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": PDF_PROMPT_TOKENS, "output_tokens": 2},
}


def image_request(reply: dict) -> list[dict]:
    text = "Describe it " + raw_directive(json.dumps(reply).encode())
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": IMAGE}}],
        }
    ]


def spent(gateway) -> Decimal:
    return sum((record.cost for record in UsageRecord.objects.filter(api_key=gateway.api_key)), Decimal(0))


def over_budget(call) -> openai.APIStatusError | anthropic.APIStatusError:
    with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as refused:
        call()
    return refused.value


def test_a_large_image_past_the_budget_is_refused_before_the_call(gateway, fake_upstream):
    """$0.002 left: a 2048² PNG to gpt-4o-mini could cost $0.0038. It is refused before any upstream call, with the
    error any request past its budget gets (a text request whose output limit the budget cannot pay). Before, it was
    reserved as 1,600 tokens ($0.00025), sent, and charged $0.0038: the key spent past its budget."""
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.002"))
    client = gateway.client()
    requests = fake_upstream.stats["requests"]
    refused = over_budget(
        lambda: client.chat.completions.create(model="gpt-test", messages=image_request(IMAGE_REPLY), max_tokens=10)
    )
    assert fake_upstream.stats["requests"] == requests
    text = over_budget(
        lambda: client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Hello"}], max_tokens=5_000
        )
    )
    assert (refused.status_code, refused.code, refused.type) == (text.status_code, text.code, text.type)
    assert refused.status_code == 429
    assert "this request could need up to" in refused.message
    assert spent(gateway) == 0


def test_a_large_image_within_the_budget_is_charged_what_the_provider_reports(gateway):
    """$0.005 left covers the image's bound: it is answered and charged the provider's count, within the budget."""
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.005"))
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=image_request(IMAGE_REPLY), max_tokens=10
    )
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.status, record.prompt_tokens, record.cost, record.usage_estimated) == (
        "ok",
        IMAGE_PROMPT_TOKENS,
        IMAGE_COST,
        False,
    )
    assert spent(gateway) <= Decimal("0.005")


def test_a_large_image_through_the_responses_api_is_refused_before_the_call(gateway, fake_upstream):
    """The Responses API's ``input_image`` is reserved as the chat completion it becomes."""
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.002"))
    requests = fake_upstream.stats["requests"]
    content = [
        {"type": "input_text", "text": "Describe it " + raw_directive(json.dumps(IMAGE_REPLY).encode())},
        {"type": "input_image", "image_url": IMAGE},
    ]
    refused = over_budget(
        lambda: gateway.client().responses.create(
            model="gpt-test", input=[{"role": "user", "content": content}], max_output_tokens=16
        )
    )
    assert (refused.status_code, fake_upstream.stats["requests"]) == (429, requests)
    assert spent(gateway) == 0


def pdf_message() -> list[dict]:
    document = {
        "type": "document",
        "source": {
            "type": "base64",
            "media_type": "application/pdf",
            "data": data_url(pdf(PDF_PAGES), "x").split(",")[1],
        },
    }
    text = "Summarise it " + raw_directive(json.dumps(PDF_REPLY).encode(), marker="raw_anthropic")
    return [{"role": "user", "content": [document, {"type": "text", "text": text}]}]


def messages_client(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)


def test_a_pdf_of_many_pages_past_the_budget_is_refused_before_the_call(gateway, fake_upstream):
    """$0.05 left: a 40-page PDF to Claude on /v1/messages could cost $0.075 (it is reserved 40 pages at 7,784 tokens,
    within the model's 128k window). Refused before any upstream call, in Anthropic's shape; before, it was
    reserved as 1,600 tokens, sent, and charged $0.075."""
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.05"))
    requests = fake_upstream.stats["requests"]
    refused = over_budget(
        lambda: messages_client(gateway).messages.create(model="claude-test", messages=pdf_message(), max_tokens=10)
    )
    assert fake_upstream.stats["requests"] == requests
    assert refused.status_code == 429
    assert refused.body["error"]["type"] == "rate_limit_error"
    assert spent(gateway) == 0


def test_a_pdf_within_the_budget_is_charged_what_the_provider_reports(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.2"))
    raw = messages_client(gateway).messages.with_raw_response.create(
        model="claude-test", messages=pdf_message(), max_tokens=10
    )
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.status, record.prompt_tokens, record.cost) == ("ok", PDF_PROMPT_TOKENS, Decimal("0.0751120000"))
    assert spent(gateway) <= Decimal("0.2")


def test_a_large_pdfs_pages_are_counted_off_the_event_loop(gateway, fake_upstream, pdf_counts):
    """A 40-page PDF of 300 KB (its base64 past ``PDF_ON_LOOP_CHARS_MOST``): admission decodes it and counts its pages
    in a thread, not on the server's event loop, where it cost about 1.4 ms (22 ms for 5 MB) during which the loop
    served nothing else. The request is refused past its budget as before."""
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.05"))
    document = {
        "type": "document",
        "source": {
            "type": "base64",
            "media_type": "application/pdf",
            "data": b64encode(pdf(PDF_PAGES, padding=300_000)).decode(),
        },
    }
    requests = fake_upstream.stats["requests"]
    refused = over_budget(
        lambda: messages_client(gateway).messages.create(
            model="claude-test", messages=[{"role": "user", "content": [document]}], max_tokens=10
        )
    )
    assert (refused.status_code, fake_upstream.stats["requests"]) == (429, requests)
    assert [(count.pages, count.on_loop) for count in pdf_counts] == [(PDF_PAGES, False)]
