"""The outbound policy (SSRF guard) on every path that talks to a provider: the chat completion through a
live llmhub and the official openai SDK, "Test connection" (``provider_health_check``) and "Import models"
(``provider_import_models``), under production rules.

Real components: the fake upstream (the target a redirect or a private URL would reach), a redirector
on 127.0.0.2 (an aiohttp server answering 301/302/303/307/308), and a resolver we control in place of
DNS (``outbound.resolver``), so that a name can resolve to a public address at save time and to
loopback later. Under production rules 127.0.0.2 is made reachable with ``LLMHUB_OUTBOUND_ALLOWED_NETWORKS``
(a production setting), while every other private address stays refused. No traffic leaves loopback: a
refused address is refused before any connection is opened, which is what these tests check.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from datetime import UTC, datetime

import openai
import pytest
from aiohttp import web

from billing.models import BudgetAlert, BudgetMetric, BudgetPeriod, ScopeKind
from billing.services.alerts import WebhookDeliveryError, budget_alert_webhook_send
from billing.services.keys import api_key_create
from providers import outbound
from providers.exceptions import ProviderError
from providers.models import Deployment, ProviderKind
from providers.services.health import provider_health_check
from providers.services.model_import import provider_import_models
from providers.validators import validate_provider_url
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.loopback_http import AiohttpThreadServer

pytestmark = pytest.mark.django_db(transaction=True)

REDIRECTOR_HOST = "127.0.0.2"
PUBLIC_AT_SAVE_TIME = "93.184.216.34"
SERVED_REPLY = "served after a same-origin redirect"
REFUSED = "upstream_destination_refused"


# -- the address rules, as pure logic ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "private_ok", "allowed"),
    [
        ("93.184.216.34", False, True),
        ("2606:4700:4700::1111", False, True),
        ("64:ff9b::5db8:d822", False, True),  # NAT64 form of a public address
        ("127.0.0.1", False, False),
        ("127.0.0.1", True, True),
        ("10.0.0.1", True, True),
        ("100.64.0.1", False, False),
        ("::ffff:10.0.0.1", False, False),
        ("::ffff:10.0.0.1", True, True),
        ("64:ff9b::7f00:1", False, False),  # NAT64 form of 127.0.0.1
        ("64:ff9b:1::5db8:d822", False, False),  # local-use NAT64: through a gateway of the local network
        ("2002:0a00:0001::1", False, False),  # 6to4 form of 10.0.0.1
        ("169.254.169.254", True, False),
        ("::ffff:169.254.169.254", True, False),
        ("64:ff9b::a9fe:a9fe", True, False),
        ("64:ff9b:1::a9fe:a9fe", True, False),
        ("2002:a9fe:a9fe::", True, False),
        ("::169.254.169.254", True, False),
        ("0.0.0.0", True, False),
        ("0.1.2.3", True, False),
        ("::", True, False),
        ("fe80::1", True, False),
        ("ff02::1", True, False),
        ("239.1.2.3", True, False),
        ("255.255.255.255", True, False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", True, False),  # Teredo
        ("100.100.100.200", True, False),  # Alibaba Cloud metadata
        ("fd00:ec2::254", True, False),  # AWS metadata over IPv6
    ],
)
def test_address_rules(address, private_ok, allowed):
    assert outbound.address_allowed(ipaddress.ip_address(address), private_ok) is allowed


# -- real components --------------------------------------------------------------------------------


class ControlledResolver:
    """DNS as a test wants it: each name answers its lists of addresses in turn, the last one for good."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = {name: list(lists) for name, lists in answers.items()}
        self.asked: list[str] = []

    def resolve_sync(self, host: str, port: int | None = None) -> list[outbound.IPAddress]:
        self.asked.append(host)
        lists = self.answers.get(host.lower())
        if not lists:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = lists.pop(0) if len(lists) > 1 else lists[0]
        return [ipaddress.ip_address(item) for item in answer]

    async def resolve(self, host: str, port: int) -> list[outbound.IPAddress]:
        return self.resolve_sync(host, port)


class Redirector:
    """An HTTP server on 127.0.0.2 that redirects: ``/cross/<code>/<path>`` to the fake upstream (another
    origin), ``/same/<code>/<path>`` to ``/served/<path>`` on itself, which answers like a provider."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.hits: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = AiohttpThreadServer(app, host=REDIRECTOR_HOST)

    @property
    def url(self) -> str:
        return self._server.origin

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(f"{request.method} {request.path}")
        parts = request.path.strip("/").split("/", 2)
        if parts[0] in ("cross", "same") and len(parts) == 3:
            target = f"{self.upstream_url}/{parts[2]}" if parts[0] == "cross" else f"/served/{parts[2]}"
            return web.Response(status=int(parts[1]), headers={"Location": target})
        if request.path == "/hook":
            return web.Response(text="ok")
        if request.path == "/served/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "served-model", "object": "model"}]})
        if request.path == "/served/v1/chat/completions":
            return web.json_response(
                {
                    "id": "chatcmpl-served",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "served-model",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": SERVED_REPLY}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
                }
            )
        return web.json_response({"error": {"message": "unknown path"}}, status=404)

    def start(self) -> Redirector:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="module")
def redirector(fake_upstream_server) -> Iterator[Redirector]:
    server = Redirector(fake_upstream_server.base_url).start()
    yield server
    server.stop()


@pytest.fixture
def resolver(monkeypatch) -> ControlledResolver:
    controlled = ControlledResolver(
        {
            "rebind.test": [[PUBLIC_AT_SAVE_TIME], ["127.0.0.1"]],  # public when saved, loopback when used
            "loopback.test": [["127.0.0.1"]],
        }
    )
    monkeypatch.setattr(outbound, "resolver", controlled)
    return controlled


@pytest.fixture
def production_rules(settings, resolver):
    """Production's outbound rules; only the redirector's own address is let through."""
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = False
    settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = [f"{REDIRECTOR_HOST}/32"]


def provider_at(base_url: str, *, kind: str = ProviderKind.OPENAI_COMPATIBLE):
    """A provider row as an earlier save left it (the factory does not run the save-time check)."""
    provider = ProviderFactory(base_url=base_url, kind=kind, timeout_seconds=3)
    ModelFactory(name="guarded", provider=provider, upstream_id="fake-gpt-4o-mini")
    return provider


def through(path: str, provider, request) -> tuple[bool, str, str]:
    """Use ``provider`` the way ``path`` does: (succeeded, error code or "", the reply or the error message)."""
    if path == "chat":
        server = request.getfixturevalue("llmhub_server")
        secret = api_key_create(user=UserFactory(), name="outbound").secret
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=20)
        try:
            completion = client.chat.completions.create(model="guarded", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as exc:
            return False, str(exc.code or exc.status_code), exc.message
        return True, "", completion.choices[0].message.content or ""
    if path == "test_connection":
        result = provider_health_check(provider=provider)
        return result.ok, "" if result.ok else "health-check-failed", result.error
    try:
        imported = provider_import_models(provider=provider)
    except ProviderError as exc:
        return False, exc.code or "", exc.message
    return True, "", ",".join(imported.created)


PATHS = ["chat", "test_connection", "import_models"]

TARGETS = [
    "127.0.0.1",
    "127.1.2.3",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "0.0.0.0",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:169.254.169.254]",
    "[64:ff9b::a9fe:a9fe]",
    "[fd00::1]",
    "[fe80::1]",
    "rebind.test",
    "metadata.google.internal",
]


def assert_refused(path: str, outcome: tuple[bool, str, str]) -> None:
    succeeded, code, message = outcome
    assert not succeeded, message
    if path == "test_connection":
        assert "may not connect" in message, message
    else:
        assert code == REFUSED, (code, message)
    assert "sk-fake-upstream-key" not in message


# -- the matrix ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("host", TARGETS)
def test_private_and_metadata_destinations_are_refused_at_connect_time(
    host, path, production_rules, fake_upstream, request
):
    base_url = f"http://{host}:{fake_upstream.port}/v1"
    if host == "rebind.test":
        validate_provider_url(base_url)  # the save-time check saw a public address
    provider = provider_at(base_url)

    assert_refused(path, through(path, provider, request))
    assert fake_upstream.stats["requests"] == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_not_followed(code, path, production_rules, redirector, fake_upstream, request):
    provider = provider_at(f"{redirector.url}/cross/{code}/v1")

    assert_refused(path, through(path, provider, request))
    assert redirector.hits, "the provider's own origin was asked"
    assert fake_upstream.stats["requests"] == 0, "the redirect's target must not be contacted"


def test_a_cross_origin_redirect_is_refused_for_anthropic_too(production_rules, redirector, fake_upstream):
    provider = provider_at(f"{redirector.url}/cross/307", kind=ProviderKind.ANTHROPIC)

    result = provider_health_check(provider=provider)

    assert not result.ok
    assert "another origin" in result.error
    assert fake_upstream.stats["requests"] == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_same_origin_redirect_is_followed(code, path, production_rules, redirector, request):
    provider = provider_at(f"{redirector.url}/same/{code}/v1")

    succeeded, _, reply = through(path, provider, request)

    assert succeeded, reply
    assert reply in ("", SERVED_REPLY, "served-model")
    assert any(hit.startswith(("GET /served/", "POST /served/")) for hit in redirector.hits)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "loopback.test", "rebind.test"])
def test_private_destinations_work_where_the_setting_allows_them(
    host, path, settings, resolver, fake_upstream, request
):
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    resolver.answers["rebind.test"] = [["127.0.0.1"]]
    provider = provider_at(f"http://{host}:{fake_upstream.port}/v1")

    succeeded, _, reply = through(path, provider, request)

    assert succeeded, reply
    assert fake_upstream.stats["requests"] >= 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("code", [302, 307])
def test_a_cross_origin_redirect_is_refused_even_where_private_addresses_are_allowed(
    code, path, settings, redirector, fake_upstream, request
):
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    provider = provider_at(f"{redirector.url}/cross/{code}/v1")

    assert_refused(path, through(path, provider, request))
    assert fake_upstream.stats["requests"] == 0


def test_a_name_is_resolved_for_every_new_connection(production_rules, resolver, fake_upstream):
    """A name is looked up and judged again for each new connection, never taken from an earlier answer."""
    resolver.answers["flip.test"] = [[REDIRECTOR_HOST], ["127.0.0.1"]]
    provider = provider_at(f"http://flip.test:{fake_upstream.port}/v1")

    first = provider_health_check(provider=provider)  # 127.0.0.2 is allowed; nothing listens on that port
    second = provider_health_check(provider=provider)

    assert "may not connect" not in first.error
    assert "may not connect" in second.error
    assert resolver.asked.count("flip.test") == 2
    assert fake_upstream.stats["requests"] == 0


def test_import_models_creates_nothing_when_refused(production_rules, fake_upstream):
    provider = provider_at(f"http://127.0.0.1:{fake_upstream.port}/v1")

    with pytest.raises(ProviderError) as excinfo:
        provider_import_models(provider=provider)

    assert excinfo.value.status_code == 502
    assert Deployment.objects.filter(provider=provider).count() == 1  # only the one made here


# -- the budget alert webhook, another outbound call ------------------------------------------------


@pytest.fixture
def alert() -> BudgetAlert:
    user = UserFactory()
    return BudgetAlert.objects.create(
        scope_kind=ScopeKind.USER,
        scope_id=user.pk,
        user=user,
        metric=BudgetMetric.COST,
        period=BudgetPeriod.MONTHLY,
        period_start=datetime(2026, 12, 1, tzinfo=UTC),
        threshold=80,
        limit=10,
        spent=8,
    )


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "169.254.169.254", "[::ffff:127.0.0.1]", "loopback.test", "metadata.google.internal"]
)
def test_the_alert_webhook_obeys_the_same_rules(host, alert, production_rules, fake_upstream):
    with pytest.raises(WebhookDeliveryError) as excinfo:
        budget_alert_webhook_send(alert=alert, url=f"http://{host}:{fake_upstream.port}/v1/models")

    assert "outbound policy" in str(excinfo.value)
    assert fake_upstream.stats["requests"] == 0
    alert.refresh_from_db()
    assert alert.channels == []


def test_the_alert_webhook_reaches_an_allowed_address(alert, production_rules, redirector):
    redirector.hits.clear()

    budget_alert_webhook_send(alert=alert, url=f"{redirector.url}/hook")

    assert redirector.hits == ["POST /hook"]
    alert.refresh_from_db()
    assert alert.channels == ["webhook"]


# -- the admin's buttons ----------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["test_connection", "import_models"])
@pytest.mark.parametrize("where", ["cross-origin redirect", "loopback"])
def test_the_admin_actions_report_the_refusal(where, action, admin_client, production_rules, redirector, fake_upstream):
    from tests.providers.test_admin import run_action

    if where == "loopback":
        provider = provider_at(f"http://127.0.0.1:{fake_upstream.port}/v1")
    else:
        provider = provider_at(f"{redirector.url}/cross/302/v1")

    _, shown = run_action(admin_client, action, provider)

    assert len(shown) == 1
    assert "failed" in shown[0][1]
    assert "may not connect" in shown[0][1]
    assert fake_upstream.stats["requests"] == 0
