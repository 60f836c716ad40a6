"""Aliases: a second public name for a model, listed by /v1/models and served by the model it names."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.services.keys import api_key_create
from providers.models import CatalogModel
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def aliased(fake_upstream):
    provider = ProviderFactory(name="aliased-provider", base_url=fake_upstream.base_url + "/v1")
    target = ModelFactory(name="gpt-4o-mini", provider=provider, input_per_mtok=Decimal("0.15"))
    CatalogModel.objects.create(name="chat-default", alias_of=target)
    return target


def test_v1_models_lists_the_alias_and_a_request_by_it_is_served_by_its_target(gateway, aliased):
    client = gateway.client()

    names = {model.id for model in client.models.list()}
    assert {"chat-default", "gpt-4o-mini"} <= names
    assert client.models.retrieve("chat-default").owned_by == "aliased-provider"

    raw = client.chat.completions.with_raw_response.create(
        model="chat-default", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().model == "gpt-4o-mini"
    assert raw.headers["x-llmhub-model"] == "gpt-4o-mini"
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.model_id == aliased.pk and record.model_name == "gpt-4o-mini"
    assert record.requested_model == "chat-default"


def test_a_key_allowed_the_target_may_use_its_alias_and_one_not_allowed_may_use_neither(
    gateway, aliased, llmhub_server
):
    import openai

    other = ModelFactory(name="other-model", provider=aliased.deployments.get().provider)
    allowed = api_key_create(user=UserFactory(username="aliaser"), name="a", allowed_models=[aliased])
    refused = api_key_create(user=UserFactory(username="refused"), name="r", allowed_models=[other])

    def client(secret):
        return openai.OpenAI(base_url=llmhub_server.url + "/v1", api_key=secret, max_retries=0, timeout=20)

    assert {m.id for m in client(allowed.secret).models.list()} == {"chat-default", "gpt-4o-mini"}
    client(allowed.secret).chat.completions.create(model="chat-default", messages=[{"role": "user", "content": "x"}])
    assert "chat-default" not in {m.id for m in client(refused.secret).models.list()}
    with pytest.raises(openai.NotFoundError):
        client(refused.secret).chat.completions.create(
            model="chat-default", messages=[{"role": "user", "content": "x"}]
        )
