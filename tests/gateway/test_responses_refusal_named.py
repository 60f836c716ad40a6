"""A /v1/responses request runs as the chat completion it translates into: a refusal of that chat completion (an
adapter's before any call, the provider's, chat validation's) names the Responses field it was made of, in its
``param`` and in the message, which until 7 December quoted the chat completion's path
(``messages[1].content[1].image_url.url``), a field the client never wrote and one index off when ``instructions``
became ``messages[0]`` (``chat.pipeline.client_refusal_named``, from ``CompletionRun.client_refusal_named`` and the
pipeline's own refusals)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from providers.models import ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_bad_input import assert_openai_error
from tests.gateway.test_openai_image_types import post
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

HTML = "data:text/html;base64,PGI+aGk8L2I+"


@pytest.fixture
def mistral(gateway):
    provider = ProviderFactory(
        name="mistral-test-provider", kind=ProviderKind.MISTRAL, base_url=gateway.upstream.base_url + "/mistral/v1"
    )
    ModelFactory(
        name="mistral-test", provider=provider, upstream_id="mistral-small-latest", input_per_mtok=Decimal("1")
    )
    return gateway


def user_item(*parts: dict) -> dict:
    return {"role": "user", "content": [{"type": "input_text", "text": "What is it?"}, *parts]}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("instructions", [None, "Be brief."], ids=["alone", "after-instructions"])
def test_an_image_refused_by_the_adapter_is_named_as_the_input_item_in_param_and_message(mistral, instructions, stream):
    """Before: param ``input[1].content`` and a message quoting ``messages[2].content[1].image_url.url`` (``[1]``
    without instructions, ``[2]`` after them)."""
    body = {
        "model": "mistral-test",
        "input": [{"role": "user", "content": "Hi"}, user_item({"type": "input_image", "image_url": HTML})],
        "stream": stream,
        **({"instructions": instructions} if instructions else {}),
    }
    served = mistral.upstream.requests_served()
    response = post(mistral, "/v1/responses", body)
    error = assert_openai_error(response, 400, param="input[1].content", code="invalid_image_format")
    assert error["message"] == (
        "`input[1].content`: Mistral takes images of type image/png, image/jpeg, image/gif, image/webp only, and this "
        "data URL's is text/html."
    )
    record = wait_for_record(response.headers["x-request-id"])
    assert (record.status, record.error_type) == ("invalid", "invalid_image_format")
    assert mistral.upstream.requests_served() == served
