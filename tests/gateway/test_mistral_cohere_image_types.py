"""An image part's data URL of a type Mistral's or Cohere's vision models do not read (both document PNG, JPEG, WEBP
and non-animated GIF: Mistral's vision guide, Cohere's image inputs guide), for a model served by Mistral or Cohere:
a 400 ``invalid_image_format`` naming ``messages[N].content[M].image_url.url`` before any call, as OpenAI's, Gemini's,
Claude's and Ollama's adapters refuse one (``common.images_checked``: ``MISTRAL_IMAGE_URLS``, ``COHERE_IMAGE_URLS``),
where until 7 December it went up as it came, after admission, for the provider's own 400 after the call."""

from __future__ import annotations

from decimal import Decimal

import pytest

from providers.models import ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_bad_input import assert_openai_error
from tests.gateway.test_openai_image_types import REFUSED, TAKEN, post, with_image
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

KINDS = {
    "mistral-test": (ProviderKind.MISTRAL, "/mistral/v1", "mistral-small-latest", "Mistral"),
    "command-test": (ProviderKind.COHERE, "/cohere", "command-a-vision-07-2025", "Cohere"),
}


@pytest.fixture
def kinds(gateway):
    for name, (kind, path, upstream_id, _provider) in KINDS.items():
        provider = ProviderFactory(name=f"{name}-provider", kind=kind, base_url=gateway.upstream.base_url + path)
        ModelFactory(name=name, provider=provider, upstream_id=upstream_id, input_per_mtok=Decimal("1"))
    return gateway


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", list(KINDS))
def test_an_image_type_the_provider_does_not_read_is_a_400_naming_it_before_any_call(kinds, model, stream):
    """Before: each went up as it came (the fake upstream answered 200; Mistral and Cohere answer their own 400)."""
    provider = KINDS[model][3]
    for case, (url, declared) in REFUSED.items():
        served = kinds.upstream.requests_served()
        body = {"model": model, "messages": with_image(url), "stream": stream}
        response = post(kinds, "/v1/chat/completions", body)
        error = assert_openai_error(
            response, 400, param="messages[1].content[1].image_url.url", code="invalid_image_format"
        )
        assert error["message"] == (
            f"`messages[1].content[1].image_url.url`: {provider} takes images of type image/png, image/jpeg, "
            f"image/gif, image/webp only, and this data URL's is {declared}."
        ), case
        record = wait_for_record(response.headers["x-request-id"])
        assert (record.status, record.error_type, record.cost) == ("invalid", "invalid_image_format", 0), case
        assert kinds.upstream.requests_served() == served, case


@pytest.mark.parametrize("model", list(KINDS))
def test_an_image_the_provider_reads_is_sent_on(kinds, model):
    """A guard: the types both document (any case, image/jpg a JPEG) and an http(s) URL, which both fetch."""
    for url in TAKEN:
        served = kinds.upstream.requests_served()
        response = post(kinds, "/v1/chat/completions", {"model": model, "messages": with_image(url)})
        assert response.status_code == 200, (url, response.text)
        assert kinds.upstream.requests_served() == served + 1, url
        assert url in str(kinds.upstream.requests[-1]["body"]), url
