"""OpenAI's prompt caching controls through llmhub (``prompt_cache_retention``, ``prompt_cache_options``,
``prompt_cache_breakpoint``): on /v1/chat/completions and /v1/responses, to an OpenAI-protocol model (``gpt-test``) and
an Anthropic-protocol one (``claude-test``), what the fake upstream receives read from its request log."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def raw(gateway, path: str, body: dict) -> httpx.Response:
    return httpx.post(gateway.url + path, json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_an_older_sdks_in_memory_retention_is_taken_and_sent_as_the_specs_in_memory(gateway, path):
    """openai SDKs before the rename sent ``in-memory``, which the enum check refused (9d83010): it is the spec's
    ``in_memory``, sent so."""
    body = {"model": "gpt-test", "prompt_cache_retention": "in-memory"}
    if path == "/v1/responses":
        body["input"] = "hi [[reply=ok]]"
    else:
        body["messages"] = [{"role": "user", "content": "hi [[reply=ok]]"}]
    reply = raw(gateway, path, body)
    assert reply.status_code == 200, reply.text
    assert gateway.upstream.requests[-1]["body"]["prompt_cache_retention"] == "in_memory"


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_cache_options_on_v1_responses_reach_an_openai_model(gateway, stream):
    """The Responses API's ``prompt_cache_options`` was taken and dropped unsaid: it is sent on in the chat completion
    (OpenAI's chat completions take it), as the client gave it; a Claude model is not sent it (its translation sends
    what Anthropic knows)."""
    client = gateway.client()
    options = {"ttl": "30m", "mode": "explicit"}
    for model in ("gpt-test", "claude-test"):
        fields = {"prompt_cache_options": options}
        if stream:
            with client.responses.create(model=model, input="hi [[reply=ok]]", stream=True, extra_body=fields) as got:
                assert [event.type for event in got][-1] == "response.completed"
        else:
            assert client.responses.create(model=model, input="hi [[reply=ok]]", extra_body=fields).output_text == "ok"
        sent = gateway.upstream.requests[-1]["body"]
        if model == "gpt-test":
            assert sent["prompt_cache_options"] == options
        else:
            assert "prompt_cache_options" not in sent
