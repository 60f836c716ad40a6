"""A deployment's prices changed by an admin while a request runs: the request is charged the prices it was admitted
at (the catalog as its process read it for the request: ``docs/ledger.md``, "Which prices a request pays"), which its
reservation held; the next request pays the new ones."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from billing.pricing import cost_for
from providers.models import CatalogModel, Deployment, Provider
from providers.selectors import model_resolve_sync
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

ADMITTED = {"input_per_mtok": Decimal("1.00"), "output_per_mtok": Decimal("4.00")}
RAISED = {"input_per_mtok": Decimal("10.00"), "output_per_mtok": Decimal("40.00")}
# A reply of 12 words at 6 tokens a second: the price changes after its first chunk, about two seconds before it ends.
SLOW = [{"role": "user", "content": "hello [[words=12]] [[tps=6]]"}]


def streamed(gateway) -> str:
    """A stream whose deployment's prices are raised after its first chunk arrived, as an admin saves them (the
    model's save signals drop the catalog's cached copies); its request id."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=30)
    with client.chat.completions.with_streaming_response.create(
        model="repriced", messages=SLOW, stream=True, stream_options={"include_usage": True}
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        deployment = Deployment.objects.get(model__name="repriced")
        for name, value in RAISED.items():
            setattr(deployment, name, value)
        deployment.save()
        assert "data: [DONE]" in list(lines)
        return response.headers["x-request-id"]


def test_a_request_is_charged_the_prices_it_was_admitted_at_when_an_admin_changes_them_midway(gateway):
    catalog = CatalogModel.objects.create(name="repriced")
    Deployment.objects.create(
        model=catalog, provider=Provider.objects.get(name="fake-openai"), upstream_id="fake-gpt-4o-mini", **ADMITTED
    )

    first = wait_for_record(streamed(gateway))

    assert first.status == "ok" and first.completion_tokens > 0
    admitted = model_resolve_sync("repriced")
    assert admitted.deployments[0].input_per_mtok == RAISED["input_per_mtok"], "the change took effect"
    at = {"prompt_tokens": first.prompt_tokens, "completion_tokens": first.completion_tokens}
    old = cost_for(model=Deployment(**ADMITTED), **at)
    assert first.cost == old, "charged the prices it was admitted at"

    second = wait_for_record(streamed(gateway))
    assert second.cost == cost_for(
        model=Deployment(**RAISED), prompt_tokens=second.prompt_tokens, completion_tokens=second.completion_tokens
    )
