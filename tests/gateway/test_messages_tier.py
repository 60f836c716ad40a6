"""The service tier a /v1/messages request asks in Anthropic's words (``service_tier``: ``auto``, ``standard_only``)
sent to an OpenAI deployment in OpenAI's, end to end: the fake upstream records the body it was sent and answers
the tier it served (the one asked, or for ``auto`` or none the project's default, ``[[project_tier=NAME]]``), and
the ledger row, called with the anthropic SDK whole and streamed, is charged the tier the reply says."""

from __future__ import annotations

from decimal import Decimal
from typing import get_args

import pytest
from anthropic.types import Usage

from providers.models import Deployment, ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_cache_write_ledger import anthropic_client
from tests.gateway.test_messages_api import refused_before_any_upstream_call
from tests.gateway.test_tier_ledger import (
    assert_charged,
    on_azure,  # noqa: F401  (a fixture)
)

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"


@pytest.fixture
def openai_itself(gateway):
    """``gpt-openai``, a model on OpenAI's own API (kind ``openai``), priced 1 and 2 a million tokens, priority × 2
    and flex × 0.5 (the prices ``assert_charged`` reads)."""
    provider = ProviderFactory(
        name="openai-itself", kind=ProviderKind.OPENAI, base_url=gateway.upstream.base_url + "/v1"
    )
    ModelFactory(
        name="gpt-openai",
        provider=provider,
        input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(2),
        cached_input_per_mtok=None,
    )
    Deployment.objects.filter(model__name="gpt-openai").update(
        priority_price_factor=Decimal(2), flex_price_factor=Decimal("0.5")
    )
    return gateway


def message_usage(gateway, model: str, asked: str | None, project: str, stream: bool):
    """The usage of a /v1/messages reply of ``model`` asking ``asked`` (None: no ``service_tier``) of a project whose
    default tier is ``project``, whole or streamed, and its request id."""
    client = anthropic_client(gateway)
    body = {"model": model, "max_tokens": 50, **({} if asked is None else {"service_tier": asked})}
    messages = [{"role": "user", "content": f"one two three [[project_tier={project}]]"}]
    if stream:
        with client.messages.stream(**body, messages=messages) as streamed:
            return streamed.get_final_message().usage, streamed.response.headers["x-request-id"]
    raw = client.messages.with_raw_response.create(**body, messages=messages)
    return raw.parse().usage, raw.headers["x-request-id"]


def tier_sent(gateway) -> str | None:
    """The ``service_tier`` the upstream's last chat completion (OpenAI's path, or an Azure deployment's) was sent
    (None: none)."""
    chats = [entry for entry in gateway.upstream.requests if entry["path"].endswith(CHAT.removeprefix("/v1"))]
    return chats[-1]["body"].get("service_tier")


@pytest.mark.parametrize(
    ("asked", "project", "sent", "factor", "tier", "said"),
    [
        # standard_only is OpenAI's default tier, asked: served and charged standard, whatever the project's default.
        ("standard_only", "priority", "default", Decimal(1), "", "standard"),
        ("standard_only", "flex", "default", Decimal(1), "", "standard"),
        # auto (or none) asks no OpenAI tier: the project's default serves it, and it is charged as served.
        ("auto", "priority", None, Decimal(2), "priority", "priority"),
        (None, "flex", None, Decimal("0.5"), "flex", "batch"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_standard_only_asks_openai_for_its_standard_tier(
    openai_itself, asked, project, sent, factor, tier, said, stream
):
    """Anthropic's ``standard_only`` went to OpenAI as no tier, so a project whose default is Priority processing
    served it at priority, which the row was charged at the standard prices (the client asked no dearer tier: the
    operator paid the difference), and one whose default is flex served it at flex, not the standard processing
    asked. It is sent as OpenAI's ``default`` (standard processing: the spec's ServiceTier), served and charged
    standard; ``auto`` and none are still sent no tier."""
    usage, request_id = message_usage(openai_itself, "gpt-openai", asked, project, stream)

    assert tier_sent(openai_itself) == sent
    assert usage.service_tier == said  # what the client reads is what it is charged at
    assert_charged(request_id, factor, tier)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_server_of_other_tiers_is_sent_no_tier_for_standard_only(gateway, stream):
    """An OpenAI-compatible server's tiers are its own (Groq's ``on_demand``, ``flex``, ``auto``, ``performance``:
    its 400 for ``default``), and Mistral has none: only OpenAI's own API is sent ``default`` for ``standard_only``;
    another gets no tier, as before, and a tier it serves dearer is charged at most the standard prices."""
    usage, _ = message_usage(gateway, "gpt-test", "standard_only", "priority", stream)

    assert tier_sent(gateway) is None
    assert usage.service_tier == "priority"


@pytest.mark.parametrize(
    ("asked", "sent", "factor", "tier", "said"),
    [
        ("standard_only", "default", Decimal(1), "", "standard"),
        ("auto", "auto", Decimal(2), "priority", "priority"),
        (None, "auto", Decimal(2), "priority", "priority"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.usefixtures("on_azure")
def test_standard_only_asks_azure_for_its_standard_tier(gateway, asked, sent, factor, tier, said, stream):
    """Azure's chat completions take ``service_tier`` (``auto``, ``default``, ``priority``) from 2025-10-01-preview on,
    and a deployment with priority processing on serves a request asking none (``auto``) at priority. Anthropic's
    ``standard_only`` was sent to Azure as no tier: such a deployment served it at priority, which Azure billed and the
    row charged at the standard prices (the operator paying the difference), the client reading ``priority``. It is
    sent as ``default``: served, said and charged standard. ``auto`` or none is sent as ``auto``, for which Azure's
    reply says the tier served (to a request that sets none it says none): priority, charged so."""
    usage, request_id = message_usage(gateway, "gpt-azure", asked, "priority", stream)

    assert tier_sent(gateway) == sent
    assert usage.service_tier == said
    assert_charged(request_id, factor, tier)


@pytest.mark.parametrize("asked", ["standard_only", "auto"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.usefixtures("on_azure")
def test_an_azure_api_version_without_service_tier_is_sent_none(gateway, asked, stream):
    """An api-version older than 2025-10-01-preview knows no ``service_tier`` (Azure's 400 "Unrecognized request
    argument supplied"): ``standard_only``, sent as ``default``, would have failed there; it is not sent, and the
    reply is charged the standard prices."""
    _, request_id = message_usage(gateway, "gpt-azure-old", asked, "default", stream)

    assert tier_sent(gateway) is None
    assert_charged(request_id, Decimal(1), "")


@pytest.mark.parametrize("model", ["claude-test", "gpt-test", "gpt-openai"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("asked", ["priority", "default", 1])
def test_a_tier_anthropic_does_not_take_is_refused_before_any_upstream_call(openai_itself, model, stream, asked):
    """Anthropic's ``service_tier`` is ``auto`` or ``standard_only`` (its 400 ``invalid_request_error`` for another);
    a translated model had any other value dropped without a word (served at the project's default) and a Claude
    deployment was sent it for Anthropic's 400 after the call. Every model refuses it before any upstream call, in
    Anthropic's shape naming the field, with the ``rejected`` row of the other field errors."""
    gateway = openai_itself
    body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "service_tier": asked}
    message = refused_before_any_upstream_call(gateway, {**body, "stream": stream})
    assert message == "service_tier: Input should be 'auto' or 'standard_only'"


# Anthropic's words for a usage's ``service_tier`` (its SDK's ``types.Usage``): standard, priority, batch.
ANTHROPIC_TIERS = set(get_args(get_args(Usage.model_fields["service_tier"].annotation)[0]))


def test_a_flex_reply_says_anthropics_batch_tier_and_is_charged_flex(openai_itself):
    """An OpenAI deployment serving a /v1/messages request at Flex processing (the project's default) had the message's
    usage say ``flex``, which is none of Anthropic's tiers. It says ``batch``, whole and in the stream's
    ``message_start`` (OpenAI prices flex as its Batch API, half the standard prices, as Anthropic's batch tier is),
    and the row is still charged flex, at the deployment's flex factor, and says so."""
    client = anthropic_client(openai_itself)
    body = {
        "model": "gpt-openai",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi [[project_tier=flex]]"}],
    }

    raw = client.messages.with_raw_response.create(**body)
    assert raw.parse().usage.service_tier == "batch"
    assert_charged(raw.headers["x-request-id"], Decimal("0.5"), "flex")

    with client.messages.with_streaming_response.create(**body, stream=True) as streamed:
        request_id = streamed.headers["x-request-id"]
        events = [event.model_dump() for event in streamed.parse()]
    said = [
        (event.get("message") or event)["usage"].get("service_tier")
        for event in events
        if event["type"] in ("message_start", "message_delta")
    ]
    assert said[0] == "batch" and set(said) - {None} <= ANTHROPIC_TIERS, said
    assert_charged(request_id, Decimal("0.5"), "flex")
