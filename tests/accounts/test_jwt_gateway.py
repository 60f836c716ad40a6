"""JWT sign-in on the gateway: /v1 through the real openai and anthropic SDKs against a live llmhub, and the
chat WebSocket through the real ASGI stack, with tokens from the local identity provider."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import anthropic
import openai
import pytest
import time_machine
from asgiref.sync import async_to_sync, sync_to_async

from billing.models import UsageRecord
from billing.services.ledger import ledger_flush
from tests.chat.conftest import events_until, open_socket
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.gateway.conftest import make_catalog

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def gateway(llmhub_server, fake_upstream, jwt_on):
    make_catalog(fake_upstream)
    return llmhub_server


def sdk(server, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0, timeout=20)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
def test_a_valid_token_is_served_on_v1_and_billed_to_its_user(gateway, jwt_on, fake_upstream, alg):
    reply = sdk(gateway, jwt_on.token(alg, sub=f"s-{alg}", preferred_username="ada")).chat.completions.create(
        model="gpt-test", messages=HELLO
    )

    assert reply.choices[0].message.content
    assert len(fake_upstream.requests) == 1
    async_to_sync(ledger_flush)()
    row = UsageRecord.objects.select_related("user").get()
    assert row.user.username == "ada"
    assert row.api_key_id is None


def test_a_streamed_reply_works_with_a_token_too(gateway, jwt_on):
    stream = sdk(gateway, jwt_on.token()).chat.completions.create(model="gpt-test", messages=HELLO, stream=True)

    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert text


def test_a_refused_token_gets_openais_401_saying_why(gateway, jwt_on, fake_upstream):
    now = int(time.time())
    token = jwt_on.token(iat=now - 7200, nbf=now - 7200, exp=now - 3600)

    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(gateway, token).chat.completions.create(model="gpt-test", messages=HELLO)

    assert refused.value.status_code == 401
    assert refused.value.body["message"] == "The token has expired (exp)."
    assert refused.value.body["code"] == "invalid_token"
    assert token.split(".")[1] not in refused.value.response.text
    assert fake_upstream.requests == []


def test_a_viewer_token_may_not_chat(gateway, jwt_on, fake_upstream):
    with pytest.raises(openai.PermissionDeniedError) as refused:
        sdk(gateway, jwt_on.token(role="viewer")).chat.completions.create(model="gpt-test", messages=HELLO)

    assert refused.value.body["code"] == "permission_denied"
    assert "viewer" in refused.value.body["message"]
    assert fake_upstream.requests == []


def test_anthropic_clients_get_anthropics_401(gateway, jwt_on):
    client = anthropic.Anthropic(
        base_url=gateway.url, api_key=jwt_on.token(aud="someone-else"), max_retries=0, timeout=20
    )

    with pytest.raises(anthropic.AuthenticationError) as refused:
        client.messages.create(model="claude-test", max_tokens=20, messages=HELLO)

    assert refused.value.body["type"] == "error"
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert refused.value.body["error"]["message"] == "The token's audience (aud) is not this server."


def test_anthropic_clients_are_served_with_a_valid_token(gateway, jwt_on):
    client = anthropic.Anthropic(base_url=gateway.url, api_key=jwt_on.token("ES256"), max_retries=0, timeout=20)

    message = client.messages.create(model="claude-test", max_tokens=20, messages=HELLO)

    assert message.content[0].text


@pytest.fixture
def socket_model(transactional_db, fake_upstream):
    return ModelFactory(provider=ProviderFactory(base_url=fake_upstream.base_url + "/v1"), name="ws-model")


async def test_the_websocket_accepts_a_token_in_its_auth_message(jwt_on, socket_model):
    ws, connected, _ = await open_socket(origin=None)
    assert connected
    try:
        await ws.send_json_to({"type": "auth", "token": jwt_on.token("ES256")})
        assert await ws.receive_json_from(timeout=10) == {"type": "auth.ok"}
        await ws.send_json_to({"type": "chat.send", "conversation": None, "model": "ws-model", "content": "Hi"})
        events = await events_until(ws, lambda e: e["type"] in ("chat.completed", "error"))
        assert events[-1]["type"] == "chat.completed", events[-1]
    finally:
        await ws.disconnect()


@pytest.mark.parametrize(
    ("claims", "code", "close"),
    [({"aud": "someone-else"}, "invalid_token", 4401), ({"role": "viewer"}, "permission_denied", 4403)],
    ids=["wrong audience", "viewer"],
)
async def test_the_websocket_refuses_a_bad_or_viewer_token(jwt_on, socket_model, claims, code, close):
    ws, connected, _ = await open_socket(origin=None)
    assert connected
    try:
        await ws.send_json_to({"type": "auth", "api_key": jwt_on.token(**claims)})
        error = await ws.receive_json_from(timeout=10)
        assert error["type"] == "error"
        assert error["code"] == code
        assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": close}
    finally:
        await ws.disconnect()


async def test_a_viewers_session_socket_is_refused(transactional_db):
    from accounts.roles import Role, role_set

    viewer = await sync_to_async(UserFactory)(username="vera")
    await sync_to_async(role_set)(viewer, Role.VIEWER)
    ws, connected, _ = await open_socket(user=viewer)
    assert connected
    try:
        error = await ws.receive_json_from(timeout=10)
        assert (error["type"], error["code"]) == ("error", "permission_denied")
        assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": 4403}
    finally:
        await ws.disconnect()


async def test_a_token_socket_closes_at_the_first_send_after_the_token_expired(jwt_on, socket_model):
    expires = int(time.time()) + 600
    ws, connected, _ = await open_socket(origin=None)
    assert connected
    try:
        await ws.send_json_to({"type": "auth", "token": jwt_on.token(exp=expires)})
        assert await ws.receive_json_from(timeout=10) == {"type": "auth.ok"}
        # Past exp and the 30 s leeway: the socket outlived its token.
        with time_machine.travel(datetime.fromtimestamp(expires + 31, UTC), tick=False):
            await ws.send_json_to({"type": "chat.send", "conversation": None, "model": "ws-model", "content": "Hi"})
            error = await ws.receive_json_from(timeout=10)
            assert error["code"] == "token_expired"
            assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": 4440}
    finally:
        await ws.disconnect()


async def test_a_token_socket_closes_once_its_user_is_deactivated(jwt_on, socket_model, settings):
    """A deactivated user's tokens are refused (docs/auth.md), on /v1 within the verified-token cache's
    minute: a socket signed in with one before must not chat on until the token expires hours later."""
    from django.contrib.auth import get_user_model

    from accounts.models import ExternalIdentity

    settings.LLMHUB_JWT_CACHE_SECONDS = 0.3
    ws, connected, _ = await open_socket(origin=None)
    assert connected
    try:
        await ws.send_json_to({"type": "auth", "token": jwt_on.token("ES256")})
        assert await ws.receive_json_from(timeout=10) == {"type": "auth.ok"}
        send = {"type": "chat.send", "conversation": None, "model": "ws-model", "content": "Hi"}
        await ws.send_json_to(send)
        events = await events_until(ws, lambda e: e["type"] in ("chat.completed", "error"))
        assert events[-1]["type"] == "chat.completed", events[-1]

        identity = await ExternalIdentity.objects.aget()
        await get_user_model().objects.filter(pk=identity.user_id).aupdate(is_active=False)
        time.sleep(0.4)
        await ws.send_json_to({**send, "request_id": "after"})
        error = await ws.receive_json_from(timeout=10)
        assert (error["type"], error["code"], error["request_id"]) == ("error", "invalid_token", "after"), error
        assert "disabled" in error["message"]
        assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": 4410}
    finally:
        await ws.disconnect()
