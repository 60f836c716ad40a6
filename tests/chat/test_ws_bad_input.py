"""The chat WebSocket answers any frame (not JSON, nested too deeply, huge, of the wrong types) with an
``error`` event and stays usable: no frame ends the socket without a close frame (issue 9, point 4)."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from websockets.asyncio.client import connect

from billing.models import UsageRecord
from billing.services.keys import api_key_create
from billing.services.ledger import ledger_flush
from chat import consumers
from chat.models import Message
from tests.chat.conftest import ends, events_until, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)

DEEP = "[" * 100_000 + "]" * 100_000


async def still_answers(ws) -> None:
    """The socket is still open and still serves: a ping gets its pong."""
    await ws.send_json_to({"type": "ping"})
    assert await ws.receive_json_from(timeout=5) == {"type": "pong"}


async def error_for(ws, frame: str | None = None, *, event: dict | None = None, binary: bytes | None = None) -> dict:
    if binary is not None:
        await ws.send_to(bytes_data=binary)
    elif event is not None:
        await ws.send_json_to(event)
    else:
        await ws.send_to(text_data=frame)
    reply = await ws.receive_json_from(timeout=10)
    assert reply["type"] == "error", reply
    assert reply["code"] and reply["message"]
    await still_answers(ws)
    return reply


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        DEEP,
        '{"type": "chat.send", "content": ' + DEEP + "}",
        '{"type": "ping", "n": ' + "9" * 5000 + "}",
        '{"type": "ping", "n": NaN}',
        b"\xff\xfe".decode("latin-1"),
    ],
    ids=["garbage", "deep-array", "deep-in-event", "5000-digits", "nan", "latin1"],
)
async def test_a_frame_that_is_not_json_gets_an_error_event(alice, socket_for, frame):
    ws = await socket_for(alice)
    reply = await error_for(ws, frame)
    assert reply["code"] == "invalid_json"


async def test_a_binary_frame_gets_an_error_event(alice, socket_for):
    ws = await socket_for(alice)
    assert (await error_for(ws, binary=b"\x00\x01"))["code"] == "invalid_json"


@pytest.mark.parametrize("event_type", [["chat.send"], {"t": 1}, 3, None, "x" * 10_000])
async def test_a_type_of_the_wrong_type_gets_an_error_event(alice, socket_for, event_type):
    ws = await socket_for(alice)
    reply = await error_for(ws, event={"type": event_type})
    assert reply["code"] == "unknown_type" and len(reply["message"]) < 200


@pytest.mark.parametrize(
    "fields",
    [
        {"model": ["m"]},
        {"model": {"name": "m"}},
        {"content": ["hi"]},
        {"content": {"text": "hi"}},
        {"content": "x" * (consumers.MAX_CONTENT_CHARS + 1)},
        {"conversation": "1"},
        {"conversation": 10**20},
        {"conversation": -1},
        {"conversation": 1.5},
        {"request_id": ["r"]},
        {"request_id": "x" * 1000},
    ],
)
async def test_a_chat_send_with_a_field_of_the_wrong_type_gets_an_error_event(alice, chat_model, socket_for, fields):
    ws = await socket_for(alice)
    event = {"type": "chat.send", "conversation": None, "model": chat_model.name, "content": "hi", **fields}
    reply = await error_for(ws, event=event)
    assert reply["code"] != "internal_error"
    assert await Message.objects.acount() == 0


async def test_a_lone_surrogate_in_content_gets_an_error_event_and_a_rejected_row(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    frame = json.dumps({"type": "chat.send", "model": chat_model.name, "request_id": "r1"})
    await ws.send_to(text_data=frame[:-1] + ', "content": "hi \\ud800"}')
    [reply] = await events_until(ws, ends("r1"))
    assert reply["type"] == "error" and reply["code"] == "invalid_value" and reply["param"] == "messages"
    await still_answers(ws)
    await ledger_flush()
    record = await UsageRecord.objects.aget()
    assert record.status == "rejected" and record.endpoint == "websocket"
    assert await Message.objects.acount() == 0


async def test_a_lone_surrogate_in_the_model_name_gets_an_error_event(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    reply = await error_for(ws, '{"type": "chat.send", "model": "m\\udfff", "content": "hi", "request_id": "r1"}')
    assert reply["code"] != "internal_error"


async def test_the_socket_still_streams_after_bad_frames(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await error_for(ws, DEEP)
    await error_for(ws, event={"type": ["chat.send"]})
    await ws.send_json_to({"type": "chat.send", "model": chat_model.name, "content": "Hello", "request_id": "ok"})
    events = await events_until(ws, ends("ok"))
    assert events[-1]["type"] == "chat.completed", events[-1]


async def test_a_bad_frame_before_auth_closes_with_a_code(transactional_db, socket_for):
    ws = await socket_for()
    # As deep as Python's parser refuses, within what an auth message may be (a larger frame: test_ws_live.py).
    await ws.send_to(text_data="[" * 5_000 + "]" * 5_000)
    assert (await ws.receive_json_from(timeout=5))["code"] == "invalid_json"
    assert (await ws.receive_json_from(timeout=5))["code"] == "auth_required"
    output = await ws.receive_output(timeout=5)
    assert output == {"type": "websocket.close", "code": consumers.CLOSE_UNAUTHENTICATED}


async def test_over_a_real_socket_deep_nesting_gets_an_error_event_not_a_dropped_connection(
    llmhub_server, fake_upstream, alice
):
    cookie = await sync_to_async(session_cookie)(alice)
    await sync_to_async(api_key_create)(user=alice, name="live")
    url = llmhub_server.url.replace("http://", "ws://") + "/ws/chat/"
    headers = {"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"}
    async with connect(url, origin=llmhub_server.url, additional_headers=headers, max_size=None) as ws:
        await ws.send(DEEP)
        reply = json.loads(await ws.recv())
        assert reply["type"] == "error" and reply["code"] == "invalid_json"
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}


async def test_a_nul_character_in_content_gets_an_error_event_and_writes_nothing(alice, chat_model, socket_for):
    """PostgreSQL cannot store U+0000 in text: a message with one (pasted from a binary file, say) is refused
    in words, like the conversation API's titles, rather than failing as "could not be started" once the
    reply was admitted (on SQLite: stored, then sent to the model)."""
    ws = await socket_for(alice)
    reply = await error_for(
        ws, event={"type": "chat.send", "model": chat_model.name, "content": "hi\x00there", "request_id": "r1"}
    )
    assert reply["request_id"] == "r1" and reply["code"] == "invalid_request"
    assert "null character" in reply["message"].lower()
    assert await Message.objects.acount() == 0
