"""The chat protocol end to end: a live llmhub (uvicorn on a real port) and the ``websockets`` client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import pytest
import uvicorn
from asgiref.sync import sync_to_async
from django.conf import settings
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from billing.models import UsageRecord
from billing.services.keys import api_key_create
from billing.services.ledger import ledger_flush
from chat import consumers
from chat.models import Message, MessageStatus
from providers.tokens import text_tokens
from tests.chat.conftest import session_cookie
from tests.conftest import LiveServer
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.test_access_log import dockerfile_command
from tests.waiting import wait_until_async


@dataclass
class Live:
    http_url: str
    ws_url: str
    model: str
    cookie: str
    api_key: str


@pytest.fixture
def live(llmhub_server, fake_upstream) -> Live:
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    model = ModelFactory(provider=provider)
    user = UserFactory()
    return Live(
        http_url=llmhub_server.url,
        ws_url=llmhub_server.url.replace("http://", "ws://") + "/ws/chat/",
        model=model.name,
        cookie=f"{settings.SESSION_COOKIE_NAME}={session_cookie(user)}",
        api_key=api_key_create(user=user, name="live").secret,
    )


async def next_event(ws) -> dict:
    return json.loads(await ws.recv(decode=True))


async def until_end(ws, request_id: str) -> list[dict]:
    events = []
    while True:
        event = await next_event(ws)
        events.append(event)
        if event.get("request_id") == request_id and event["type"] in ("chat.completed", "chat.cancelled", "error"):
            return events


async def test_session_socket_streams_cancels_and_continues(live):
    async with connect(live.ws_url, origin=live.http_url, additional_headers={"Cookie": live.cookie}) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await next_event(ws) == {"type": "pong"}

        await ws.send(
            json.dumps(
                {"type": "chat.send", "conversation": None, "model": live.model, "content": "Hi", "request_id": "a"}
            )
        )
        events = await until_end(ws, "a")
        assert events[0]["type"] == "chat.started"
        assert events[-1]["type"] == "chat.completed"
        assert "".join(e["content"] for e in events if e["type"] == "chat.delta") == "Echo: Hi"
        assert Decimal(events[-1]["usage"]["cost"]) > 0
        conversation = events[0]["conversation"]

        await ws.send(
            json.dumps(
                {
                    "type": "chat.send",
                    "conversation": conversation,
                    "model": live.model,
                    "content": "More [[words=200]] [[tps=25]]",
                    "request_id": "b",
                }
            )
        )
        seen = 0
        while seen < 3:
            seen += (await next_event(ws))["type"] == "chat.delta"
        await ws.send(json.dumps({"type": "chat.cancel", "request_id": "b"}))
        events = await until_end(ws, "b")
        assert events[-1]["type"] == "chat.cancelled"
        message_id = events[-1]["message"]

    await ledger_flush()
    reply = await Message.objects.aget(pk=message_id)
    assert reply.status == MessageStatus.CANCELLED
    assert reply.conversation_id == conversation
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert (record.status, record.endpoint) == ("cancelled", "websocket")


async def test_api_key_socket(live):
    async with connect(live.ws_url, origin=live.http_url) as ws:
        await ws.send(json.dumps({"type": "auth", "api_key": live.api_key}))
        assert await next_event(ws) == {"type": "auth.ok"}
        await ws.send(json.dumps({"type": "chat.send", "conversation": None, "model": live.model, "content": "yo"}))
        events = await until_end(ws, (await next_event(ws))["request_id"])
        assert events[-1]["type"] == "chat.completed"


async def test_anonymous_socket_is_closed_with_4401(live):
    async with connect(live.ws_url, origin=live.http_url) as ws:
        await ws.send(json.dumps({"type": "chat.send", "conversation": None, "model": live.model, "content": "x"}))
        error = await next_event(ws)
        assert (error["type"], error["code"]) == ("error", "auth_required")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 4401
    assert await sync_to_async(Message.objects.count)() == 0


async def test_cross_site_origin_is_refused_at_the_handshake(live):
    with pytest.raises(InvalidStatus) as refused:
        async with connect(live.ws_url, origin="https://evil.example", additional_headers={"Cookie": live.cookie}):
            pass
    assert refused.value.response.status_code == 403


@pytest.fixture
def two_servers(tmp_path):
    """Two llmhub processes on the test database, as two servers behind a load balancer."""
    from tests.billing.test_concurrency import ServerProcess
    from tests.conftest import wait_for_port

    servers = [ServerProcess(None, tmp_path / f"server-{n}.log", None) for n in range(2)]
    try:
        for server in servers:
            wait_for_port(server.port, process=server.process)
        yield [server.url.replace("http://", "ws://") + "/ws/chat/" for server in servers]
    finally:
        for server in servers:
            server.stop()


def chat_send(request_id: str, content: str, model: str, conversation: int | None) -> str:
    event = {"type": "chat.send", "conversation": conversation, "model": model, "content": content}
    return json.dumps({**event, "request_id": request_id})


async def test_one_reply_at_a_time_in_a_conversation_across_server_processes(live, two_servers):
    """Two sockets on two server processes: the second is refused while the first one's reply streams,
    with nothing written and nothing billed, and goes on once it has ended."""
    async with connect(two_servers[0]) as first, connect(two_servers[1]) as second:
        for ws in (first, second):
            await ws.send(json.dumps({"type": "auth", "api_key": live.api_key}))
            assert await next_event(ws) == {"type": "auth.ok"}
        await first.send(chat_send("a", "Hi", live.model, None))
        conversation = (await until_end(first, "a"))[0]["conversation"]
        await first.send(chat_send("b", "More [[words=300]] [[tps=25]]", live.model, conversation))
        while (await next_event(first))["type"] != "chat.delta":
            pass

        await second.send(chat_send("c", "me too", live.model, conversation))
        [busy] = await until_end(second, "c")
        assert (busy["type"], busy["code"]) == ("error", "conversation_busy")

        await first.send(json.dumps({"type": "chat.cancel", "request_id": "b"}))
        assert (await until_end(first, "b"))[-1]["type"] == "chat.cancelled"
        await second.send(chat_send("d", "me too", live.model, conversation))
        assert (await until_end(second, "d"))[-1]["type"] == "chat.completed"

    users = [m.content async for m in Message.objects.filter(conversation_id=conversation, role="user")]
    assert users == ["Hi", "More [[words=300]] [[tps=25]]", "me too"]
    replies = Message.objects.filter(conversation_id=conversation, role="assistant")
    replied = sorted([m.request_id async for m in replies])

    async def one_row_per_reply() -> bool:
        return sorted([r.request_id async for r in UsageRecord.objects.all()]) == replied

    # The servers write their rows after each reply: one per reply, none for the refused send.
    await wait_until_async(one_row_per_reply, "the ledger holds a row for each reply and no other")


@pytest.fixture
def two_beating_servers(tmp_path, monkeypatch):
    """Two llmhub processes whose replies beat every second (LLMHUB_CHAT_HEARTBEAT_INTERVAL): dead 4 s after
    their last beat. The test may kill the first (``processes[0]``)."""
    from tests.billing.test_concurrency import ServerProcess
    from tests.conftest import wait_for_port

    monkeypatch.setenv("LLMHUB_CHAT_HEARTBEAT_INTERVAL", "1")
    servers = [ServerProcess(None, tmp_path / f"server-{n}.log", None) for n in range(2)]
    try:
        for server in servers:
            wait_for_port(server.port, process=server.process)
        yield servers
    finally:
        for server in servers:
            server.stop()


async def test_a_server_killed_mid_reply_frees_its_conversation_within_seconds(live, two_beating_servers):
    """A server process SIGKILLed while a reply streams leaves that reply ``streaming``: it held the
    conversation (``conversation_busy``) for an hour. Its heartbeat stops with the process, and a send from
    another server goes through seconds later, the dead reply closed with what it had written."""
    doomed, survivor = two_beating_servers
    async with connect(survivor.url.replace("http://", "ws://") + "/ws/chat/") as second:
        await second.send(json.dumps({"type": "auth", "api_key": live.api_key}))
        assert await next_event(second) == {"type": "auth.ok"}
        async with connect(doomed.url.replace("http://", "ws://") + "/ws/chat/") as first:
            await first.send(json.dumps({"type": "auth", "api_key": live.api_key}))
            assert await next_event(first) == {"type": "auth.ok"}
            await first.send(chat_send("a", "Hi", live.model, None))
            conversation = (await until_end(first, "a"))[0]["conversation"]
            await first.send(chat_send("b", "Long [[words=400]] [[tps=10]]", live.model, conversation))
            # Its reply under way before the other server is asked (sent at once, "c" went first on a loaded machine
            # in a full run, and was answered).
            started = await next_event(first)
            assert started.get("request_id") == "b" and started["type"] != "error", started
            await second.send(chat_send("c", "me too", live.model, conversation))
            [busy] = await until_end(second, "c")
            assert (busy["type"], busy["code"]) == ("error", "conversation_busy")
            deltas = started["type"] == "chat.delta"
            while deltas < 25:  # 2.5 s: a checkpoint has saved some of it
                deltas += (await next_event(first))["type"] == "chat.delta"

            doomed.process.kill()
            doomed.process.wait(timeout=10)

        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            await second.send(chat_send(f"d{attempt}", "me too", live.model, conversation))
            events = await until_end(second, f"d{attempt}")
            if events[-1]["type"] != "error":
                break
            assert events[-1]["code"] == "conversation_busy"
            assert time.monotonic() - started < 30, "the killed server's reply still holds the conversation"
            await asyncio.sleep(0.5)
        assert events[-1]["type"] == "chat.completed"

    dead = await Message.objects.aget(conversation_id=conversation, role="assistant", status="cancelled")
    assert dead.content  # what the last checkpoint saved before the kill
    assert dead.error_message == "The reply did not finish: the server stopped while it streamed."


class SilencedLink:
    """A TCP relay in front of the live server that, once ``silence()`` is called, forwards nothing more either
    way and closes nothing: a client whose network vanished, without a close frame or a reset. The server's
    keepalive pings then go unanswered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.silenced = asyncio.Event()
        self.url = ""
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> SilencedLink:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/ws/chat/"
        return self

    def silence(self) -> None:
        self.silenced.set()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [client_writer, server_writer]

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            silenced = asyncio.ensure_future(self.silenced.wait())
            try:
                while True:
                    read = asyncio.ensure_future(reader.read(65536))
                    await asyncio.wait({read, silenced}, return_when=asyncio.FIRST_COMPLETED)
                    if silenced.done():
                        read.cancel()  # what is on its way stays unread
                        return
                    if not (data := read.result()):
                        return
                    writer.write(data)
                    await writer.drain()
            finally:
                silenced.cancel()

        with contextlib.suppress(OSError):
            await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def reply_ended() -> Message:
    """The assistant's reply, once it no longer streams."""

    async def ended() -> Message | None:
        return await Message.objects.filter(role="assistant").exclude(status="streaming").afirst()

    return await wait_until_async(ended, "the reply ended", timeout=30)


async def assert_cancelled_and_billed_what_was_read(reply: Message, caplog) -> None:
    """A 400,000-word reply stopped as on a disconnect: saved as cancelled with part of it, its ledger row
    ``client_disconnected`` and billed for the part read from the upstream (sent on or not), and no error logged."""
    assert reply.status == MessageStatus.CANCELLED, (reply.status, reply.error_message)
    assert 0 < len(reply.content.split()) < 400_000
    await ledger_flush()
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert record.status == "client_disconnected"
    assert 0 < record.completion_tokens < 400_000
    # A cut stream brings no usage: billed for what the upstream wrote up to the cut, counted from that text.
    assert record.usage_estimated
    assert record.completion_tokens == text_tokens(reply.content)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


@pytest.fixture
def pinged(live) -> Iterator[LiveServer]:
    """A second live llmhub, on the same database, whose keepalive pings every second and waits a second for
    the answer."""
    server = LiveServer(ws_ping_seconds=1.0).start()
    yield server
    server.stop()


async def test_a_client_whose_network_vanished_mid_reply_is_found_and_billed_what_was_sent(live, pinged, caplog):
    """A client gone without a close frame (its network vanished) leaves the server's pings unanswered, and the
    server closes the socket. A reply streaming fast then failed its next send after that close: it was logged
    as an error ("relaying the reply failed") and saved as failed. It is stopped at once, as on a disconnect:
    saved as cancelled with what was sent, the upstream stopped and billed for that, not the whole reply."""
    link = await SilencedLink(pinged.port).start()
    try:
        async with connect(link.url, additional_headers={"Cookie": live.cookie}) as ws:
            await ws.send(chat_send("a", "Long [[words=400000]] [[tps=4000]]", live.model, None))
            received = 0
            while received < 5:
                received += (await next_event(ws))["type"] == "chat.delta"
            link.silence()
            reply = await reply_ended()
    finally:
        await link.close()
    await assert_cancelled_and_billed_what_was_read(reply, caplog)


def test_production_finds_a_client_gone_silent_within_20_seconds():
    """uvicorn's keepalive defaults (a ping every 20 s, 20 s to answer) let a vanished client's reply stream for up
    to 40 s (one shorter than that streamed whole, billed whole): production pings every 10 s and waits 10 s."""
    command = dockerfile_command()  # docker-compose.yml's too (tests/test_access_log.py)
    assert command[0] == "uvicorn"
    params = uvicorn.main.make_context("uvicorn", command[1:]).params
    assert params["ws"] == "auto"  # websockets, which pings (wsproto would not)
    assert 0 < params["ws_ping_interval"] and 0 < params["ws_ping_timeout"]
    assert params["ws_ping_interval"] + params["ws_ping_timeout"] <= 20


def largest_chat_frame() -> bytes:
    """The largest frame a chat client may legitimately send: a ``chat.send`` of the longest content (counted in
    characters), each character the costliest JSON can spell (outside the BMP, escaped as two six-character
    escapes, a backslash, "u" and four hex digits each: 12 bytes; UTF-8 would take 4, a control character's
    escape 6), the longest model name and request id likewise."""
    from chat.consumers import MAX_CONTENT_CHARS, MAX_DATABASE_ID, MAX_REQUEST_ID_CHARS
    from providers.models import CatalogModel

    costliest = "\U0001f600"
    frame = {
        "type": "chat.send",
        "conversation": MAX_DATABASE_ID,
        "model": costliest * CatalogModel._meta.get_field("name").max_length,
        "content": costliest * MAX_CONTENT_CHARS,
        "request_id": costliest * MAX_REQUEST_ID_CHARS,
        "reasoning_effort": "medium",
    }
    return json.dumps(frame, ensure_ascii=True).encode()


def test_production_takes_the_largest_chat_frame_and_not_much_more():
    """uvicorn's default --ws-max-size (16 MiB) let anyone, signed in or not, make the server hold 16 MiB per
    frame before the consumer refused the content as too long: production takes the largest legitimate frame
    (docs/deployment.md) and refuses one much larger than it."""
    largest = len(largest_chat_frame())
    assert largest > 1_200_000
    command = dockerfile_command()  # docker-compose.yml's too (tests/test_access_log.py)
    params = uvicorn.main.make_context("uvicorn", command[1:]).params
    assert largest <= params["ws_max_size"] < 2 * largest


def test_make_run_takes_the_largest_chat_frame_and_not_much_more():
    """daphne's own limit (1 MiB a message and a frame) refused a legitimate chat.send of long content: make run's
    server takes what production takes."""
    import daphne.cli

    from llmhub import devserver

    largest = len(largest_chat_frame())
    args = daphne.cli.CommandLineInterface().parser.parse_args(devserver.arguments(["llmhub.asgi:application"]))
    assert largest <= args.websocket_max_message_size < 2 * largest
    assert largest <= args.websocket_max_frame_size < 2 * largest
    # make run's own arguments (from the command line) still win
    args = daphne.cli.CommandLineInterface().parser.parse_args(
        devserver.arguments(["--websocket-max-message-size", "5", "llmhub.asgi:application"])
    )
    assert args.websocket_max_message_size == 5


class UnreadSocket:
    """A raw WebSocket client with a tiny receive buffer that, once its chat.send is out, reads nothing more and
    closes nothing: a peer that stopped reading (a hung tab, a stalled network). What the server sends piles up
    in its own buffers, and its sends wait for room that never comes."""

    def __init__(self, port: int, cookie: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        # Small segments (loopback's are 64 KB): the server's kernel send buffer, sized by them, stays small.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws/chat/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n\r\n"
            ).encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self.sock.recv(1)  # byte by byte: nothing of the frames after it is read
        assert answer.startswith(b"HTTP/1.1 101"), answer

    def send_text(self, text: str) -> None:
        payload = text.encode()
        assert 125 < len(payload) < 65536
        mask = os.urandom(4)
        header = bytes([0x81, 0x80 | 126]) + struct.pack("!H", len(payload)) + mask
        self.sock.sendall(header + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self) -> None:
        self.sock.close()


async def test_a_client_that_stops_reading_mid_reply_is_let_go_and_billed_what_was_sent(live, monkeypatch, caplog):
    """A client that stopped reading while more than the server buffers was queued for it (a hung tab) left a send
    of its reply waiting for ever, and the reply neither stopped nor settled: streaming, unbilled, the upstream
    held open. A send now has SEND_TIMEOUT_SECONDS; past that the reply is stopped as on a disconnect: saved as
    cancelled with what was written, billed for that: what the upstream wrote up to the cut, sent on or not (the
    provider charges for it), counted from that text, since a cut stream brings no usage."""
    monkeypatch.setattr(consumers, "SEND_TIMEOUT_SECONDS", 1.0)
    client = await asyncio.to_thread(UnreadSocket, int(live.http_url.rsplit(":", 1)[1]), live.cookie)
    try:
        client.send_text(chat_send("a", "Long [[words=400000]] " + "x" * 120, live.model, None))
        reply = await reply_ended()
    finally:
        client.close()
    await assert_cancelled_and_billed_what_was_read(reply, caplog)


async def closing_events(ws) -> tuple[list[dict], int]:
    """The events the server sends until it closes the socket, and its close code."""
    events = []
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(60):  # liveness only: a socket the server never closes fails here
            while True:
                events.append(await next_event(ws))
    return events, closed.value.rcvd.code


async def test_an_auth_frame_larger_than_any_token_closes_the_socket_with_1009(live):
    """A socket not signed in may send only an auth message, whose key or token is short: a larger frame is refused
    unparsed (it was parsed whole, up to the server's 1.25 MiB, signed in or not) and the socket closed."""
    async with connect(live.ws_url, origin=live.http_url) as ws:
        await ws.send(json.dumps({"type": "auth", "api_key": "sk-llmhub-" + "x" * consumers.MAX_AUTH_FRAME_CHARS}))
        events, code = await closing_events(ws)
    assert [event["code"] for event in events] == ["frame_too_large"]
    assert code == consumers.CLOSE_MESSAGE_TOO_BIG == 1009

    # A frame as large as an auth message may be is read as one: a wrong key is refused as such.
    async with connect(live.ws_url, origin=live.http_url) as ws:
        frame = json.dumps({"type": "auth", "api_key": ""})
        await ws.send(frame.replace('""', '"' + "x" * (consumers.MAX_AUTH_FRAME_CHARS - len(frame)) + '"'))
        events, code = await closing_events(ws)
    assert [event["code"] for event in events] == ["invalid_api_key"]
    assert code == consumers.CLOSE_UNAUTHENTICATED

    # Signed in, a socket sends frames as large as a chat.send may be.
    async with connect(live.ws_url, origin=live.http_url) as ws:
        await ws.send(json.dumps({"type": "auth", "api_key": live.api_key}))
        assert await next_event(ws) == {"type": "auth.ok"}
        await ws.send(json.dumps({"type": "ping", "padding": "x" * consumers.MAX_CONTENT_CHARS}))
        assert await next_event(ws) == {"type": "pong"}


@pytest.mark.parametrize("signed_in", [False, True])
async def test_a_flood_of_frames_is_cut_off_with_1008(live, monkeypatch, signed_in):
    """A socket, signed in or not, may send a burst of frames and then so many a second (a token bucket): past that
    it is closed (the server parsed and answered every frame a client sent, as fast as it sent them)."""
    monkeypatch.setattr(consumers, "FRAME_BURST", 5)
    monkeypatch.setattr(consumers, "FRAMES_PER_SECOND", 0.01)  # no frame back within the test
    async with connect(live.ws_url, origin=live.http_url) as ws:
        if signed_in:
            await ws.send(json.dumps({"type": "auth", "api_key": live.api_key}))
            assert await next_event(ws) == {"type": "auth.ok"}
        for _ in range(50):  # not signed in: binary frames, each answered with an error, the socket left open
            await ws.send(json.dumps({"type": "ping"}) if signed_in else b"\x00")
        events, code = await closing_events(ws)
    # The burst, less the auth message; then the refusal.
    answered, refused = events[:-1], events[-1]
    assert len(answered) == 5 - signed_in, events
    assert all(event == {"type": "pong"} if signed_in else event["code"] == "invalid_json" for event in answered)
    assert refused["code"] == "too_many_frames"
    assert code == consumers.CLOSE_POLICY_VIOLATION == 1008


async def test_frames_at_the_allowed_pace_are_all_answered(live, monkeypatch):
    monkeypatch.setattr(consumers, "FRAME_BURST", 3)
    async with connect(live.ws_url, origin=live.http_url, additional_headers={"Cookie": live.cookie}) as ws:
        for _ in range(10):  # one at a time: each waits for its answer, well under FRAMES_PER_SECOND (10) a second
            await ws.send(json.dumps({"type": "ping"}))
            assert await next_event(ws) == {"type": "pong"}
            await asyncio.sleep(0.15)
