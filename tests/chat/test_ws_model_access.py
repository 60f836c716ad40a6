"""A chat socket signed in with a gateway key (a program, as on /v1) is answered for a model its key or plan excludes
as for one that does not exist (``model_not_found``), as /v1 answers it: another answer tells the key which models
exist. The chat page's socket (a browser session, whose menu lists every model, the locked ones too) names the plan."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from billing.models import Plan, UsageRecord
from billing.services.keys import api_key_create
from billing.services.ledger import ledger_flush
from billing.services.plans import plan_assign
from tests.chat.conftest import ends, events_until
from tests.factories import ModelFactory

pytestmark = pytest.mark.django_db(transaction=True)


async def key_socket(socket_for, secret: str):
    ws = await socket_for(None)
    await ws.send_json_to({"type": "auth", "api_key": secret})
    assert await ws.receive_json_from(timeout=5) == {"type": "auth.ok"}
    return ws


async def refusal(ws, model: str, request_id: str) -> dict:
    await ws.send_json_to(
        {"type": "chat.send", "conversation": None, "model": model, "content": "hi", "request_id": request_id}
    )
    [error] = await events_until(ws, ends(request_id))
    assert error["type"] == "error", error
    return error


def unnamed(error: dict, model: str) -> dict:
    """The error with the model's name taken out of its message and its request id left out: what tells one model
    from another."""
    return {**error, "message": error["message"].replace(model, "MODEL"), "request_id": None}


@pytest.mark.parametrize("excluded_by", ["key", "plan"])
async def test_a_keys_socket_is_answered_for_an_excluded_model_as_for_an_unknown_one(
    alice, chat_model, socket_for, excluded_by
):
    other = await sync_to_async(ModelFactory)(
        provider=(await chat_model.deployments.select_related("provider").aget()).provider
    )
    if excluded_by == "key":
        created = await sync_to_async(api_key_create)(user=alice, name="narrow", allowed_models=[other])
    else:
        narrow = await Plan.objects.acreate(name="Other only", allow_all_models=False)
        await narrow.allowed_models.aset([other])
        await sync_to_async(plan_assign)(user=alice, plan=narrow)
        created = await sync_to_async(api_key_create)(user=alice, name="wide")
    ws = await key_socket(socket_for, created.secret)

    excluded = await refusal(ws, chat_model.name, "excluded")
    unknown = await refusal(ws, "no-such-model", "unknown")
    assert unknown["code"] == "model_not_found"
    assert unnamed(excluded, chat_model.name) == unnamed(unknown, "no-such-model")
    # The ledger still says why.
    await ledger_flush()
    row = await UsageRecord.objects.aget(model_name=chat_model.name)
    assert (row.status, row.error_type, row.endpoint) == ("rejected", "model_not_allowed", "websocket")


async def test_the_chat_pages_socket_still_names_the_plan(alice, chat_model, socket_for):
    narrow = await Plan.objects.acreate(name="Nothing", allow_all_models=False)
    await sync_to_async(plan_assign)(user=alice, plan=narrow)
    ws = await socket_for(alice)
    error = await refusal(ws, chat_model.name, "r1")
    assert error["code"] == "model_not_allowed"
    assert "menu" in error["message"]
