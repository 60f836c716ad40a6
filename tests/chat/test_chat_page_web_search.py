"""The chat page's reply from a model that searches the web on every request (OpenAI's search models): each attempt
that answered a reply resumed on another deployment searched and is charged its search, and the user's budget
reserves them all before anything is sent. Through the real socket, the pipeline and the fake upstream."""

from __future__ import annotations

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async

from billing.models import Plan, UsageRecord
from billing.services.ledger import ledger_flush
from billing.services.plans import plan_assign
from providers.models import CatalogModel, Deployment
from tests.chat.conftest import ends, events_until
from tests.factories import ProviderFactory

pytestmark = pytest.mark.django_db(transaction=True)

PRICES = {"input_per_mtok": Decimal(1), "output_per_mtok": Decimal(2), "web_search_per_1k": Decimal(25)}


def searching_model(upstream) -> CatalogModel:
    """A model resuming a cut reply (``resume_on_failure``) on two deployments that search on every request: the
    first cut after 3 chunks, the second answering."""
    model = CatalogModel.objects.create(
        name="searching", strategy="priority", resume_on_failure=True, context_window=16_000, max_output_tokens=1_000
    )
    for priority, (name, upstream_id) in enumerate((("first", "fault-cut-3"), ("second", "fake-gpt-4o-mini"))):
        provider = ProviderFactory(name=f"searching-{name}", base_url=upstream.base_url + "/v1")
        Deployment.objects.create(
            model=model,
            name=name,
            provider=provider,
            upstream_id=upstream_id,
            priority=priority,
            searches_every_request="always",
            **PRICES,
        )
    return model


def on_budget(user, budget: str) -> None:
    plan_assign(
        user=user,
        plan=Plan.objects.create(name=f"budget-{budget}", allow_all_models=True, monthly_budget_usd=Decimal(budget)),
    )


async def reply(socket, request_id: str) -> list[dict]:
    await socket.send_json_to(
        {"type": "chat.send", "model": "searching", "content": "hello there [[words=8]]", "request_id": request_id}
    )
    return await events_until(socket, ends(request_id))


async def test_a_resumed_reply_on_a_search_model_reserves_and_is_charged_each_attempts_search(
    alice, bob, socket_for, fake_upstream
):
    """$0.04 left does not pay for the two searches ($0.05) a reply resumed once may run: refused before anything is
    sent. With $0.09, the reply is cut, resumed on the second deployment and charged both searches, within the
    budget. Before, one search was reserved and alice's reply went through, spending past her budget."""
    await sync_to_async(searching_model)(fake_upstream)
    await sync_to_async(on_budget)(alice, "0.04")
    await sync_to_async(on_budget)(bob, "0.09")

    refused = await reply(await socket_for(alice), "r0")
    assert refused[-1]["type"] == "error", refused[-1]
    assert "could need up to" in refused[-1]["message"]
    assert fake_upstream.stats["requests"] == 0

    answered = await reply(await socket_for(bob), "r1")
    assert answered[-1]["type"] == "chat.completed", answered[-1]
    await ledger_flush()
    row = await UsageRecord.objects.aget(user_id=bob.pk)
    assert (row.status, row.resumed, row.web_search_requests) == ("ok", True, 2)
    assert row.cost <= Decimal("0.09") and row.cost > Decimal("0.05")
