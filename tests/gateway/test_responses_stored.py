"""Stored responses of ``/v1/responses``: ``store`` (OpenAI's default), ``GET``/``DELETE /v1/responses/{id}``,
``…/input_items`` and ``previous_response_id``, through the official ``openai`` SDK against a live llmhub with the
fake upstream behind it (which records what it was sent). Objects are checked against OpenAI's published spec."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
import time_machine
from django.db import connection
from django.db.models import Sum, TextField
from django.db.models.functions import Cast, Length
from django.test import override_settings

from billing.models import KeyScope, UsageRecord
from billing.services.keys import api_key_create
from chat.models import StoredResponse
from chat.services_responses import stored_responses_expire
from llmhub.testing.openapi import validate_openai_schema
from providers.moderation import policy_cache
from tests.factories import UserFactory
from tests.gateway.test_moderation import policy_on
from tests.gateway.test_responses_api import WEATHER, raw_events
from tests.test_metrics import TOKEN, scrape, scrape_until, value
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)


def _request_id(response_id: str) -> str:
    return response_id.replace("resp_", "req_", 1)


def test_a_response_is_stored_retrieved_listed_and_deleted(gateway):
    client = gateway.client()
    first = client.responses.create(model="gpt-test", instructions="Be brief.", input="first [[reply=one]]")
    assert first.store is True  # stored by default, as OpenAI does

    raw = client.responses.with_raw_response.retrieve(first.id)
    validate_openai_schema(raw.http_response.json(), "Response")
    assert raw.parse().model_dump() == first.model_dump()

    listed = client.responses.input_items.with_raw_response.list(first.id)
    validate_openai_schema(listed.http_response.json(), "ResponseItemList")
    [item] = listed.parse().data
    assert item.type == "message" and item.role == "user" and item.content[0].text == "first [[reply=one]]"

    deleted = httpx.delete(f"{gateway.url}/v1/responses/{first.id}", headers={"Authorization": f"Bearer {gateway.key}"})
    assert deleted.status_code == 200
    assert deleted.json() == {"id": first.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(first.id)
    assert gone.value.body["code"] == "not_found" and gone.value.body["param"] == "response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)


def test_previous_response_id_sends_the_whole_conversation_and_each_response_keeps_it(gateway):
    client = gateway.client()
    first = client.responses.create(model="gpt-test", instructions="Be brief.", input="first [[reply=one]]")
    [item] = client.responses.input_items.list(first.id).data
    second = client.responses.create(
        model="claude-test", previous_response_id=first.id, instructions="Be terse.", input="second [[reply=two]]"
    )
    assert second.previous_response_id == first.id and second.output_text == "two"
    # The whole conversation reached the model (another model than the first's); the previous instructions did not
    # (OpenAI's semantics).
    sent = gateway.upstream.requests[-1]["body"]
    assert sent["system"] == "Be terse." or sent["system"][0]["text"] == "Be terse."
    assert [(message["role"], _text(message["content"])) for message in sent["messages"]] == [
        ("user", "first [[reply=one]]"),
        ("assistant", "one"),
        ("user", "second [[reply=two]]"),
    ]
    # It is the prompt: estimated, reserved and charged as one.
    first_row = wait_for_record(_request_id(first.id))
    second_row = wait_for_record(_request_id(second.id))
    assert second_row.prompt_tokens > first_row.prompt_tokens and second_row.operation == "responses"

    items = client.responses.input_items.list(second.id, order="asc").data
    assert [item.type for item in items] == ["message", "message", "message"]
    assert items[0].id == item.id  # the chain's items keep their ids
    assert items[1].id == first.output[0].id  # the previous output, as it was answered

    # The one chained on a deleted one still reads and chains (the deleted one's items are kept for its chain).
    client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-test", previous_response_id=first.id, input="again")
    assert refused.value.body == {
        "message": f"Previous response with id '{first.id}' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses"
    assert client.responses.retrieve(second.id).output_text == "two"
    third = client.responses.create(model="gpt-test", previous_response_id=second.id, input="third [[reply=3]]")
    assert len(client.responses.input_items.list(third.id).data) == 5


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def test_store_false_keeps_nothing(gateway):
    client = gateway.client()
    response = client.responses.create(model="gpt-test", input="hi [[reply=ok]]", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve(response.id)
    assert missing.value.body["code"] == "not_found" and response.id in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-test", input="again", previous_response_id=response.id)
    assert refused.value.body["code"] == "previous_response_not_found"
    assert refused.value.body["param"] == "previous_response_id"
    assert not StoredResponse.objects.exists()


def test_another_users_response_is_as_absent_as_an_unknown_one(gateway):
    client = gateway.client()
    mine = client.responses.create(model="gpt-test", input="secret [[reply=ok]]")
    other = gateway.client(api_key=api_key_create(user=UserFactory(username="mallory"), name="m").secret)
    answers = []
    for response_id in (mine.id, "resp_" + "0" * 32):
        with pytest.raises(openai.NotFoundError) as retrieved:
            other.responses.retrieve(response_id)
        with pytest.raises(openai.NotFoundError) as listed:
            other.responses.input_items.list(response_id)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(response_id)
        with pytest.raises(openai.BadRequestError) as chained:
            other.responses.create(model="gpt-test", input="go on", previous_response_id=response_id)
        answers.append(
            [
                {**error.value.body, "message": error.value.body["message"].replace(response_id, "ID")}
                for error in (retrieved, listed, chained)
            ]
        )
    assert answers[0] == answers[1]
    assert client.responses.retrieve(mine.id).id == mine.id  # the owner's delete was not done by the other


def test_a_key_reaches_the_responses_its_user_made_as_it_reaches_conversations(gateway):
    """As a conversation: a second key of the same user without ``conversations:manage`` does not reach what
    another key made; one with the scope does."""
    made = gateway.client().responses.create(model="gpt-test", input="hi [[reply=ok]]")
    narrow = gateway.client(api_key=api_key_create(user=gateway.user, name="app").secret)
    broad = gateway.client(
        api_key=api_key_create(user=gateway.user, name="admin", scopes=[KeyScope.CONVERSATIONS]).secret
    )
    with pytest.raises(openai.NotFoundError):
        narrow.responses.retrieve(made.id)
    assert broad.responses.retrieve(made.id).id == made.id
    assert broad.responses.create(model="gpt-test", input="on [[reply=k]]", previous_response_id=made.id).output_text


def test_an_expired_response_is_gone_at_once_and_the_task_deletes_it(gateway, settings):
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    client = gateway.client()
    created = client.responses.create(model="gpt-test", input="hi [[reply=ok]]")
    later = datetime.now(UTC) + timedelta(days=30, minutes=1)
    with time_machine.travel(later, tick=True):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(created.id)
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="gpt-test", input="again", previous_response_id=created.id)
        assert refused.value.body["code"] == "previous_response_not_found"
        assert StoredResponse.objects.count() == 1  # the task has not run: gone all the same
        assert stored_responses_expire(batch_size=1) == 1
    assert not StoredResponse.objects.exists()
    with time_machine.travel(datetime.now(UTC) + timedelta(days=29), tick=True):
        kept = client.responses.create(model="gpt-test", input="hi [[reply=ok]]")
        assert stored_responses_expire() == 0
        assert client.responses.retrieve(kept.id).id == kept.id


def test_a_streamed_response_is_stored_when_it_completes(gateway):
    client = gateway.client()
    with client.responses.create(model="gpt-test", input="[[words=5]]", stream=True) as stream:
        events = list(stream)
    final = events[-1].response
    assert events[-1].type == "response.completed" and final.store is True
    raw = client.responses.with_raw_response.retrieve(final.id)
    validate_openai_schema(raw.http_response.json(), "Response")
    assert raw.parse().output == final.output and raw.parse().usage == final.usage


def test_a_stream_that_failed_is_not_stored(gateway):
    _, events = raw_events(gateway, {"model": "gpt-test", "input": "[[words=9]] [[fault=cut-3]]"})
    assert events[-1][1]["type"] == "response.failed" and events[-1][1]["response"]["store"] is False
    with pytest.raises(openai.NotFoundError):
        gateway.client().responses.retrieve(events[-1][1]["response"]["id"])


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
def test_a_tool_call_and_reasoning_in_the_previous_output_round_trip(gateway, model):
    client = gateway.client()
    first = client.responses.create(
        model=model, input="Weather in Rome? [[reasoning=I need the tool]]", tools=[WEATHER]
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    second = client.responses.create(
        model=model,
        tools=[WEATHER],
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert second.output_text == "Tool result: sunny"
    if model == "gpt-test":
        sent = gateway.upstream.requests[-1]["body"]["messages"]
        assert [message["role"] for message in sent] == ["user", "assistant", "tool"]
        assert sent[1]["tool_calls"][0]["id"] == call.call_id and sent[2]["tool_call_id"] == call.call_id
        assert sent[1]["reasoning_content"] == "I need the tool"


def test_moderation_reads_the_chained_conversation(gateway):
    client = gateway.client()
    first = client.responses.create(model="gpt-test", input="say adipiscing [[reply=ok]]")
    policy_cache.invalidate()
    policy_on("gpt-test", blocklist="adipiscing")
    try:
        served = gateway.upstream.requests_served()
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="gpt-test", input="and now?", previous_response_id=first.id)
    finally:
        policy_cache.invalidate()
    assert refused.value.code == "content_policy_violation"
    assert refused.value.body["param"] == "previous_response_id"
    assert gateway.upstream.requests_served() == served


def test_reads_write_no_ledger_row_and_another_method_is_a_405_with_its_rejected_row(gateway):
    client = gateway.client()
    created = client.responses.create(model="gpt-test", input="hi [[reply=ok]]")
    wait_for_record(_request_id(created.id))
    headers = {"Authorization": f"Bearer {gateway.key}"}
    got = httpx.get(f"{gateway.url}/v1/responses/{created.id}", headers=headers)
    put = httpx.put(f"{gateway.url}/v1/responses/{created.id}", headers=headers, json={})
    assert got.status_code == 200 and put.status_code == 405 and put.headers["Allow"] == "GET, DELETE"
    record = wait_for_record(put.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses"
    assert not UsageRecord.objects.filter(request_id=got.headers["x-request-id"]).exists()


def test_cancel_and_bad_pagination_are_clear_4xx(gateway):
    client = gateway.client()
    created = client.responses.create(model="gpt-test", input="hi [[reply=ok]]")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(created.id)
    assert refused.value.body["code"] == "not_cancellable"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")
    for query, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "msg_x"}, "after")):
        with pytest.raises(openai.BadRequestError) as bad:
            client.responses.input_items.list(created.id, **query)
        assert bad.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="gpt-test", input="hi", store="yes")
    assert bad.value.body["param"] == "store"
    # `include` takes the spec's values (none adds anything here); another is named.
    assert client.responses.retrieve(created.id, include=["reasoning.encrypted_content"]).id == created.id
    assert client.responses.input_items.list(created.id, include=["message.input_image.image_url"]).data
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.retrieve(created.id, include=["everything"])
    assert bad.value.body["param"] == "include"


def test_input_items_are_paged_as_the_spec_says(gateway):
    client = gateway.client()
    created = client.responses.create(
        model="gpt-test",
        input=[{"role": "user", "content": f"turn {index}"} for index in range(5)]
        + [{"role": "user", "content": "[[reply=ok]]"}],
    )
    newest = client.responses.input_items.list(created.id, limit=2)
    assert [item.content[0].text for item in newest.data] == ["[[reply=ok]]", "turn 4"] and newest.has_more
    every = [item.content[0].text for item in client.responses.input_items.list(created.id, limit=2, order="asc")]
    assert every == [f"turn {index}" for index in range(5)] + ["[[reply=ok]]"]  # the SDK followed `after`


def test_a_response_that_could_not_be_stored_is_answered_all_the_same(gateway, caplog):
    """The database refuses the row (its table is gone for a moment): the answer, and the ledger row, are not
    lost; the failure is logged without the conversation, and counted."""
    client = gateway.client()
    with override_settings(LLMHUB_METRICS_TOKEN=TOKEN, LLMHUB_METRICS_ALLOWED_IPS=[]):
        before = value(scrape(gateway.url), "llmhub_responses_not_stored_total")
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE chat_storedresponse RENAME TO chat_storedresponse_away")
        try:
            with caplog.at_level(logging.ERROR, logger="chat.api_responses"):
                response = client.responses.create(model="gpt-test", input="private words [[reply=ok]]")
        finally:
            with connection.cursor() as cursor:
                cursor.execute("ALTER TABLE chat_storedresponse_away RENAME TO chat_storedresponse")
        scrape_until(gateway.url, "llmhub_responses_not_stored_total", before + 1)
    assert response.output_text == "ok" and response.store is False
    assert wait_for_record(_request_id(response.id)).status == "ok"
    [line] = [record.getMessage() for record in caplog.records if "could not be stored" in record.getMessage()]
    assert response.id in line and "private" not in line


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
def test_a_previous_tool_call_without_its_output_is_a_400_as_openai_answers(gateway, model):
    """The Agents SDK chaining on a response that called a tool, with a new message and no ``function_call_output``:
    OpenAI answers 400 "No tool output found for function call …"; sent on, every provider would refuse the turn
    (an assistant's tool call with no result) as an upstream error, after a call and its retries."""
    client = gateway.client()
    first = client.responses.create(model=model, input="Weather in Rome?", tools=[WEATHER])
    [call] = [item for item in first.output if item.type == "function_call"]
    served = gateway.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model, tools=[WEATHER], previous_response_id=first.id, input="and now?")
    assert refused.value.body == {
        "message": f"No tool output found for function call {call.call_id}.",
        "type": "invalid_request_error",
        "param": "input",
        "code": "invalid_value",
    }
    assert gateway.upstream.requests_served() == served
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses"
    # The same given directly in `input` (a custom tool's call too); with its output, the round goes through.
    given = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model, tools=[WEATHER], input=[{"role": "user", "content": "hi"}, given])
    assert refused.value.body["message"] == "No tool output found for function call c1."
    answered = {"type": "function_call_output", "call_id": "c1", "output": "sunny"}
    assert client.responses.create(model=model, tools=[WEATHER], input=[given, answered]).output_text == (
        "Tool result: sunny"
    )


def test_a_response_whose_input_holds_nul_characters_is_stored_and_chains(gateway):
    """A tool's output with a NUL (Codex's shell read a binary file): PostgreSQL cannot hold U+0000 in text or JSON,
    so the response was not stored (``store: false``) and the next turn's ``previous_response_id`` was not found.
    Kept as chat messages are (``text_storable``): without the NUL, on every database alike."""
    client = gateway.client()
    body = {
        "model": "gpt-test",
        "instructions": "Be\x00 brief.",
        "input": [{"role": "user", "content": "ELF\x00\x00 [[reply=ok]]"}],
        "metadata": {"note\x00": "x\x00"},
    }
    first = client.responses.create(**body)
    assert first.store is True and first.output_text == "ok"
    kept = client.responses.retrieve(first.id)
    assert kept.instructions == "Be brief." and kept.metadata == {"note": "x"}
    [item] = client.responses.input_items.list(first.id).data
    assert item.content[0].text == "ELF [[reply=ok]]"
    second = client.responses.create(model="gpt-test", previous_response_id=first.id, input="more [[reply=two]]")
    assert second.output_text == "two"
    sent = gateway.upstream.requests[-1]["body"]["messages"]
    assert [_text(message["content"]) for message in sent] == ["ELF [[reply=ok]]", "ok", "more [[reply=two]]"]


def test_an_item_id_given_twice_is_a_400_as_openai_answers(gateway):
    """Items of one id in the whole input (an output item sent again beside the `previous_response_id` that holds
    it, as some SDKs do): OpenAI answers 400 "Duplicate item found with id …". Sent on, the model got the turn twice,
    and the stored items shared an id: the SDK's pager following `after` over them never ended."""
    client = gateway.client()
    first = client.responses.create(model="gpt-test", input="hi [[reply=ok]]")
    served = gateway.upstream.requests_served()
    again = first.output[0].model_dump(exclude_none=True)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(
            model="gpt-test", previous_response_id=first.id, input=[again, {"role": "user", "content": "more"}]
        )
    assert refused.value.body == {
        "message": f"Duplicate item found with id {again['id']}. Remove duplicate items from your input and try again.",
        "type": "invalid_request_error",
        "param": "input",
        "code": "invalid_value",
    }
    twice = [{"id": "msg_1", "role": "user", "content": text} for text in ("a", "b [[reply=ok]]")]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-test", input=twice)
    assert refused.value.body["message"].startswith("Duplicate item found with id msg_1.")
    assert gateway.upstream.requests_served() == served
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-test", input=[{"id": 7, "role": "user", "content": "hi"}])
    assert refused.value.body["param"] == "input[0].id"
    # A null id is none: the item gets one of its own.
    unnamed = client.responses.create(model="gpt-test", input=[{"id": None, "role": "user", "content": "[[reply=ok]]"}])
    [item] = client.responses.input_items.list(unnamed.id).data
    assert item.id.startswith("msg_")


def test_an_id_no_row_can_hold_is_not_found_not_a_500(gateway):
    """A NUL (PostgreSQL refuses one in a query) or a lone surrogate (UTF-8 cannot encode one) in a response's id:
    no response has that id, so it is the answer to an unknown id, never a 500."""
    headers = {"Authorization": f"Bearer {gateway.key}"}
    for method, path in (
        ("GET", "resp_%00x"),
        ("DELETE", "resp_%00x"),
        ("GET", "resp_%00x/input_items"),
        ("POST", "resp_%00x/cancel"),
    ):
        reply = httpx.request(method, f"{gateway.url}/v1/responses/{path}", headers=headers, timeout=20)
        assert reply.status_code == 404, reply.text
        assert reply.json()["error"]["code"] == "not_found"
    for previous in ("resp_\x00x", "resp_\ud800x"):
        body = json.dumps({"model": "gpt-test", "input": "hi", "previous_response_id": previous})  # escaped, ASCII
        reply = httpx.post(
            f"{gateway.url}/v1/responses",
            content=body,
            headers={**headers, "Content-Type": "application/json"},
            timeout=20,
        )
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == "previous_response_not_found"
        assert wait_for_record(reply.headers["x-request-id"]).status == "rejected"


def _stored_bytes() -> int:
    """What the stored responses' items take in the database: the sum of their rows' item columns, as text."""
    sizes = StoredResponse.objects.aggregate(
        input=Sum(Length(Cast("input_items", TextField()))), output=Sum(Length(Cast("output_items", TextField())))
    )
    return (sizes["input"] or 0) + (sizes["output"] or 0)


def test_a_long_chain_is_stored_in_space_linear_in_its_turns(gateway):
    """A Codex session: each turn a tool's long output, chained with `previous_response_id`. Each response kept its
    whole chained input, every earlier turn again: N turns took O(N²) (100 turns of 50 KB outputs, hundreds of MB).
    Each keeps its own new items and refers to the previous one: every turn adds about what it brought."""
    client = gateway.client()
    previous = None
    added = []
    for turn in range(12):
        before = _stored_bytes()
        ask = {
            "model": "gpt-test",
            "previous_response_id": previous,
            "input": f"turn {turn}: {'x' * 4000} [[reply=ok]]",
        }
        if turn % 2:  # streamed and whole alike
            with client.responses.create(**ask, stream=True) as stream:
                response = list(stream)[-1].response
        else:
            response = client.responses.create(**ask)
        assert response.store is True and response.output_text == "ok"
        previous = response.id
        added.append(_stored_bytes() - before)
    assert added[-1] < 1.5 * added[0], added  # the 12th turn stores about what the first did, not 12 times it
    # The whole conversation still reaches the model, and input_items still lists it.
    assert len(gateway.upstream.requests[-1]["body"]["messages"]) == 2 * 12 - 1
    assert len(list(client.responses.input_items.list(previous, order="asc"))) == 2 * 12 - 1


def test_input_items_of_a_chain_are_what_they_were_when_each_response_kept_its_whole_input(gateway):
    """Each response keeps its own items and a reference to the one it continued; ``input_items`` lists the whole
    input it answered all the same (every earlier turn's input and output, then its own), as OpenAI's does, and a
    row kept whole (every row from before references) reads and chains alike."""
    client = gateway.client()
    first = client.responses.create(model="gpt-test", input="first [[reply=one]]")
    second = client.responses.create(model="gpt-test", previous_response_id=first.id, input="second [[reply=two]]")
    third = client.responses.create(model="gpt-test", previous_response_id=second.id, input="third [[reply=3]]")
    raw = client.responses.input_items.with_raw_response.list(third.id, order="asc", limit=100)
    validate_openai_schema(raw.http_response.json(), "ResponseItemList")
    listed = [item.model_dump() for item in raw.parse().data]
    own = {response.id: client.responses.input_items.list(response.id).data[0] for response in (first, second)}
    assert listed == [
        own[first.id].model_dump(),
        first.output[0].model_dump(),
        own[second.id].model_dump(),
        second.output[0].model_dump(),
        listed[-1],
    ]
    assert listed[-1]["content"][0]["text"] == "third [[reply=3]]"
    kept = StoredResponse.objects.get(response_id=third.id)
    assert [item["id"] for item in kept.input_items] == [listed[-1]["id"]]  # its own only, and a reference
    assert kept.previous.response_id == second.id

    client.responses.create(model="gpt-test", previous_response_id=third.id, input="fourth [[reply=4]]")
    sent = gateway.upstream.requests[-1]["body"]
    # The third kept whole, as before references: the same list, and the same conversation sent on.
    StoredResponse.objects.filter(pk=kept.pk).update(previous=None, input_items=listed)
    assert [item.model_dump() for item in client.responses.input_items.list(third.id, order="asc", limit=100)] == (
        listed
    )
    client.responses.create(model="gpt-test", previous_response_id=third.id, input="fourth [[reply=4]]")
    assert gateway.upstream.requests[-1]["body"] == sent


def test_a_deleted_response_others_continue_is_gone_for_its_owner_and_kept_for_their_chain(gateway):
    """Deleting a response that a later one continues: a 404 for it (GET, DELETE, input_items), not to be continued,
    but the later one still reads and chains whole; its items go once none refers to them."""
    client = gateway.client()
    headers = {"Authorization": f"Bearer {gateway.key}"}
    first = client.responses.create(model="gpt-test", input="first [[reply=one]]")
    second = client.responses.create(model="gpt-test", previous_response_id=first.id, input="second [[reply=two]]")
    client.responses.delete(first.id)
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/input_items")):
        reply = httpx.request(method, f"{gateway.url}/v1/responses/{first.id}{path}", headers=headers, timeout=20)
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found", (method, path)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-test", previous_response_id=first.id, input="again")
    assert refused.value.body["code"] == "previous_response_not_found"
    assert len(client.responses.input_items.list(second.id).data) == 3
    assert stored_responses_expire() == 0  # the hourly task keeps it for the second's chain
    third = client.responses.create(model="gpt-test", previous_response_id=second.id, input="third [[reply=3]]")
    assert [_text(message["content"]) for message in gateway.upstream.requests[-1]["body"]["messages"]] == [
        "first [[reply=one]]",
        "one",
        "second [[reply=two]]",
        "two",
        "third [[reply=3]]",
    ]
    # The last one deleted first: it goes at once, and nothing before it is kept for it.
    client.responses.delete(third.id)
    assert set(StoredResponse.objects.values_list("response_id", flat=True)) == {first.id, second.id}
    client.responses.delete(second.id)
    assert not StoredResponse.objects.exists()  # the hidden first, kept for the second alone, went with it


def _dangling() -> list[str]:
    """Stored responses whose ``previous`` names no row (what the database's reference must never let be)."""
    known = set(StoredResponse.objects.values_list("pk", flat=True))
    return [row.response_id for row in StoredResponse.objects.exclude(previous=None) if row.previous_id not in known]


@pytest.mark.parametrize("deleted_first", [True, False])
def test_a_response_kept_as_the_one_it_continues_is_deleted(gateway, monkeypatch, deleted_first):
    """The owner deletes a response while a request continuing it is answered: the order is forced at the moment
    the new one is kept (the real deletion, then the real save, or the other way round). Deleted first, it went at
    once (none continued it): the database refuses the new row's reference and the answer says ``store: false``.
    Kept first, the deleted one is hidden and kept for the new one's chain. Never a 500, never a row that refers to
    none."""
    from chat import api_responses
    from chat.selectors import ConversationReach
    from chat.services_responses import stored_response_delete

    client = gateway.client()
    first = client.responses.create(model="gpt-test", input="first [[reply=one]]")
    save = api_responses.stored_response_save
    reach = ConversationReach(user_id=gateway.user.pk)

    def save_around_the_delete(**kwargs):
        if deleted_first:
            assert stored_response_delete(reach=reach, response_id=first.id)
            return save(**kwargs)
        kept = save(**kwargs)
        assert stored_response_delete(reach=reach, response_id=first.id)
        return kept

    monkeypatch.setattr(api_responses, "stored_response_save", save_around_the_delete)
    second = client.responses.create(model="gpt-test", previous_response_id=first.id, input="second [[reply=two]]")
    monkeypatch.undo()
    assert second.output_text == "two" and second.store is (not deleted_first)
    assert wait_for_record(_request_id(second.id)).status == "ok"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    assert _dangling() == []
    if deleted_first:
        assert not StoredResponse.objects.exists()
        return
    assert StoredResponse.objects.get(response_id=first.id).deleted_at is not None
    listed = [item.content[0].text for item in client.responses.input_items.list(second.id, order="asc").data]
    assert listed == ["first [[reply=one]]", "one", "second [[reply=two]]"]
    client.responses.delete(second.id)  # the last one: the hidden one kept for it alone goes with it
    assert not StoredResponse.objects.exists()
