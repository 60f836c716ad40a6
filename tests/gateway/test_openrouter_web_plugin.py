"""OpenRouter's web plugin charged as OpenRouter bills it: per web result ($4 per 1,000), up to the plugin's
``max_results`` (5 unless set), not per request. Called with the openai SDK on ``/v1/chat/completions`` against the
fake upstream as an OpenRouter deployment, whole and streamed, with ``plugins: [{"id": "web"}]`` or a model id ending
``:online``: each row counts the results (``web_search_requests``) at the deployment's ``web_search_per_1k``, and
admission reserves them. OpenRouter's reply says nowhere how many results it fetched, so each request is charged its
``max_results``."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from billing.services.budgets import api_key_limits_set
from providers.models import Deployment, ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_cache_write_ledger import anthropic_client
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

# 6 prompt tokens (3 + 3 words, the directive's two words included), a reply of 2 tokens: $0.00001 at $1 and $2 a
# million, and each web result $4 per 1,000.
ASK = [{"role": "user", "content": "weather [[reply=sunny today]]"}]
TOKENS = Decimal("0.0000100000")
RESULT = Decimal("0.004")
PRICES = {"input_per_mtok": Decimal(1), "output_per_mtok": Decimal(2), "web_search_per_1k": Decimal(4)}


@pytest.fixture
def router(gateway):
    """``router-test`` (``openai/gpt-4o-mini``) and ``router-online`` (its ``:online`` id) on an OpenRouter provider."""
    provider = ProviderFactory(
        name="fake-openrouter", kind=ProviderKind.OPENROUTER, base_url=gateway.upstream.base_url + "/v1"
    )
    ModelFactory(name="router-test", provider=provider, upstream_id="openai/gpt-4o-mini")
    ModelFactory(name="router-online", provider=provider, upstream_id="openai/gpt-4o-mini:online")
    Deployment.objects.filter(model__name__in=("router-test", "router-online")).update(**PRICES)
    return gateway


def asked(gateway, model: str, *, stream: bool = False, **extra) -> str:
    """A chat completion of ``model`` asked whole or streamed, ``extra`` in its body: its request id."""
    client = gateway.client()
    body = {"model": model, "messages": ASK, "extra_body": extra}
    if stream:
        with client.chat.completions.with_streaming_response.create(
            **body, stream=True, stream_options={"include_usage": True}
        ) as response:
            list(response.iter_lines())
            return response.headers["x-request-id"]
    raw = client.chat.completions.with_raw_response.create(**body)
    assert raw.parse().choices[0].message.content
    return raw.headers["x-request-id"]


@pytest.mark.parametrize(
    ("model", "plugins", "results"),
    [
        ("router-test", [{"id": "web", "max_results": 3}], 3),
        ("router-test", [{"id": "web"}], 5),  # OpenRouter's default
        ("router-online", None, 5),  # ``:online`` is the plugin at its default
        ("router-online", [{"id": "web", "max_results": 2}], 2),  # the plugin's settings apply to ``:online`` too
        ("router-test", [{"id": "file-parser"}], 0),  # another plugin fetches no web result
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_web_plugin_request_is_charged_its_results(router, model, plugins, results, stream):
    """Before, a web plugin request was charged no search (it has no ``web_search_options``), though OpenRouter
    billed it up to $0.02; a deployment made to search on every request was charged one search, at a price per
    request."""
    extra = {} if plugins is None else {"plugins": plugins}
    record = wait_for_record(asked(router, model, stream=stream, **extra))
    sent = router.upstream.requests[-1]["body"]
    assert sent.get("plugins") == plugins
    assert (record.prompt_tokens, record.completion_tokens, record.web_search_requests) == (6, 2, results)
    assert record.cost == TOKENS + results * RESULT


def test_a_web_plugin_request_to_another_provider_is_charged_no_result(router):
    """The plugin is OpenRouter's: an OpenAI-compatible deployment is charged no result for it."""
    Deployment.objects.filter(model__name="gpt-test").update(**PRICES)
    record = wait_for_record(asked(router, "gpt-test", plugins=[{"id": "web"}]))
    assert (record.web_search_requests, record.cost) == (0, TOKENS)


def test_admission_reserves_the_results_the_plugin_may_fetch(router):
    """A key with $0.015 left pays for a request fetching 3 results ($0.012), but not for one fetching OpenRouter's
    default 5 ($0.02): that one is refused before the provider is called. Before, no result was reserved, and the
    key spent past its budget."""
    api_key_limits_set(api_key=router.api_key, budget_usd=Decimal("0.015"))
    client = router.client()
    requests = router.upstream.stats["requests"]
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="router-test", messages=ASK, max_tokens=10, extra_body={"plugins": [{"id": "web"}]}
        )
    assert "this request could need up to" in refused.value.message
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="router-online", messages=ASK, max_tokens=10)
    assert router.upstream.stats["requests"] == requests, "refused before any upstream call"

    raw = client.chat.completions.with_raw_response.create(
        model="router-test", messages=ASK, max_tokens=10, extra_body={"plugins": [{"id": "web", "max_results": 3}]}
    )
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.web_search_requests, record.cost) == (3, TOKENS + 3 * RESULT)


def test_a_messages_request_sends_the_plugin_to_openrouter_and_is_charged_its_results(router):
    """A /v1/messages request's ``plugins`` goes to OpenRouter in its translation, as a chat completion's does, and is
    charged the results it fetches: before, the translation left it out, and nothing was searched."""
    raw = anthropic_client(router).messages.with_raw_response.create(
        model="router-test", max_tokens=50, messages=ASK, extra_body={"plugins": [{"id": "web", "max_results": 4}]}
    )
    assert raw.parse().content[0].text
    assert router.upstream.requests[-1]["body"]["plugins"] == [{"id": "web", "max_results": 4}]
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.web_search_requests, record.cost) == (4, TOKENS + 4 * RESULT)


@pytest.mark.parametrize(
    ("model", "plugins", "results"),
    [
        ("router-test", [{"id": "web", "max_results": 3}], 3),
        ("router-online", None, 5),
        ("gpt-test", [{"id": "web"}], 0),  # not OpenRouter: no plugin runs
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_text_completion_with_the_web_plugin_is_charged_its_results(router, model, plugins, results, stream):
    """A /v1/completions request to OpenRouter with the plugin, or to an ``:online`` id, goes up with it (its
    ``plugins`` sent on as the rest of the body, its model id the ``:online`` one) and is charged its results, as a
    chat completion is. Before, admission reserved them and the row charged none (a process lost before settling
    charged them all), so OpenRouter's results went unpaid and a key could spend past its budget by them."""
    Deployment.objects.filter(model__name="gpt-test").update(**PRICES)
    client = router.client()
    prompt = "weather [[reply=sunny today]]"
    extra = {} if plugins is None else {"plugins": plugins}
    if stream:
        with client.completions.with_streaming_response.create(
            model=model, prompt=prompt, max_tokens=10, stream=True, extra_body=extra
        ) as response:
            assert "sunny" in "".join(response.iter_lines())
            request_id = response.headers["x-request-id"]
    else:
        raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=10, extra_body=extra)
        assert raw.parse().choices[0].text
        request_id = raw.headers["x-request-id"]
    record = wait_for_record(request_id)
    sent = router.upstream.requests[-1]
    assert (sent["path"], sent["body"].get("plugins")) == ("/v1/completions", plugins)
    assert (record.web_search_requests, record.cost) == (results, Decimal("0.0000070000") + results * RESULT)
