"""Sign-ins are recorded: a success as ``auth.login`` by the user, a failure as ``auth.login_failed`` with the
name that was tried and never the password, a sign-out as ``auth.logout``; and a change made through the API
with a gateway key is by that key, not by an anonymous visitor."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import time_machine
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from audit import signals
from audit.models import AuditEvent
from billing.models import KeyScope
from billing.services.keys import api_key_create
from tests.audit.conftest import AGENT, ROOT_PASSWORD, events, last_event

pytestmark = pytest.mark.django_db

WRONG_PASSWORD = "wrong-canary-password-77"


def test_a_sign_in_is_recorded_with_the_users_address_and_client(root):
    client = Client(HTTP_USER_AGENT=AGENT, REMOTE_ADDR="203.0.113.9")

    response = client.post(reverse("admin:login"), {"username": "root", "password": ROOT_PASSWORD})

    assert response.status_code == 302
    event = last_event("auth.login")
    assert (event.actor_type, event.actor_id, event.actor_repr) == ("user", str(root.pk), "root")
    assert (event.target_type, event.target_id) == ("auth.user", str(root.pk))
    assert (event.ip_address, event.user_agent) == ("203.0.113.9", AGENT)
    assert not events("auth.user.change")  # the last_login stamp is no change of its own


def test_a_failed_sign_in_names_the_attempted_user_never_the_password(root):
    client = Client(HTTP_USER_AGENT=AGENT, REMOTE_ADDR="2001:DB8::7")

    response = client.post(reverse("admin:login"), {"username": "root", "password": WRONG_PASSWORD})

    assert response.status_code == 200  # the form again, with its error
    assert not events("auth.login")
    event = last_event("auth.login_failed")
    assert (event.actor_type, event.target_type, event.target_repr) == ("anonymous", "auth.user", "root")
    assert event.ip_address == "2001:db8::7"
    recorded = json.dumps(list(AuditEvent.objects.values()), default=str)
    assert WRONG_PASSWORD not in recorded and ROOT_PASSWORD not in recorded


def test_a_sign_out_is_recorded(admin_client, root):
    response = admin_client.post(reverse("admin:logout"))

    assert response.status_code in (200, 302)
    event = last_event("auth.logout")
    assert (event.actor_repr, event.target_id) == ("root", str(root.pk))


@pytest.fixture
def api_keys_audited():
    """Changes of gateway keys recorded like an admin change, for this test: a change made over the API."""
    signals.connect(["billing.ApiKey"])
    yield
    signals.disconnect(["billing.ApiKey"])


def test_a_change_over_the_api_with_a_gateway_key_is_by_that_key(root, api_keys_audited):
    manager = api_key_create(user=root, name="manager", scopes=[KeyScope.KEYS_MANAGE])
    client = APIClient(HTTP_USER_AGENT=AGENT)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {manager.secret}")

    response = client.post("/api/keys/", {"name": "made-by-a-key"}, format="json")

    assert response.status_code == 201, response.content
    event = last_event("billing.apikey.create")
    assert event.changes["name"] == [None, "made-by-a-key"]
    assert (event.actor_type, event.actor_id, event.actor_repr) == (
        "key",
        str(manager.api_key.pk),
        manager.api_key.prefix,
    )
    assert (event.ip_address, event.user_agent) == ("127.0.0.1", AGENT)
    assert "secret_hash" in event.changes and event.changes["secret_hash"][1] == "[secret]"


def test_a_change_over_the_api_in_a_session_is_by_the_user(admin_client, root, api_keys_audited):
    response = admin_client.post("/api/keys/", {"name": "made-in-a-session"}, content_type="application/json")

    assert response.status_code == 201, response.content
    event = last_event("billing.apikey.create")
    assert (event.actor_type, event.actor_repr) == ("user", "root")


@time_machine.travel(datetime(2026, 12, 5, 10, 0, 30, tzinfo=UTC), tick=False)
def test_a_flood_of_failed_sign_ins_cannot_fill_the_log(root):
    """The log is append-only and nothing deletes from it: an anonymous visitor posting wrong passwords must
    not be able to grow it without bound. As for refused tokens: one event a minute per (name tried, address),
    30 a minute in all."""
    same = Client(REMOTE_ADDR="203.0.113.9")
    for _ in range(20):
        same.post(reverse("admin:login"), {"username": "root", "password": WRONG_PASSWORD})
    assert len(events("auth.login_failed")) == 1

    for n in range(40):  # a spray: other names, other addresses
        Client(REMOTE_ADDR=f"198.51.100.{n}").post(
            reverse("admin:login"), {"username": f"user{n}", "password": WRONG_PASSWORD}
        )
    assert len(events("auth.login_failed")) == 30

    with time_machine.travel(datetime(2026, 12, 5, 10, 1, 5, tzinfo=UTC), tick=False):
        same.post(reverse("admin:login"), {"username": "root", "password": WRONG_PASSWORD})
    assert len(events("auth.login_failed")) == 31  # the next minute, the same attempt is recorded again


@time_machine.travel(datetime(2026, 12, 5, 10, 0, 30, tzinfo=UTC), tick=False)
def test_failed_sign_ins_from_one_ipv6_network_are_one_address_to_the_log_limit(root):
    """An IPv6 host holds a whole /64: taking a new address of it for each guess, it had each recorded (one event
    a minute per name and address) and used up the minute's 30 alone, so nobody else's failure was recorded.
    Its addresses count as one, as the sign-in throttle counts them; the event keeps the address it came from."""
    for n in range(40):
        Client(REMOTE_ADDR=f"2001:db8:0:7::{n + 1:x}").post(
            reverse("admin:login"), {"username": "root", "password": WRONG_PASSWORD}
        )
    assert [event.ip_address for event in events("auth.login_failed")] == ["2001:db8:0:7::1"]

    Client(REMOTE_ADDR="2001:db8:0:8::1").post(reverse("admin:login"), {"username": "root", "password": WRONG_PASSWORD})
    Client(REMOTE_ADDR="::ffff:198.51.100.7").post(
        reverse("admin:login"), {"username": "root", "password": WRONG_PASSWORD}
    )
    Client(REMOTE_ADDR="198.51.100.7").post(reverse("admin:login"), {"username": "root", "password": WRONG_PASSWORD})
    assert len(events("auth.login_failed")) == 3  # another /64 is another address; a mapped IPv4 one is that one


def test_a_failed_sign_in_while_the_cache_is_down_is_still_a_failed_sign_in(root, monkeypatch):
    """The throttle lives in the cache (Redis in production): when it does not answer, a wrong password still
    gets the form's error, not a 500, and the failure is recorded (unthrottled while the cache is away)."""
    import redis

    from audit import services

    def down(*args, **kwargs):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(services.cache, "add", down)

    response = Client(REMOTE_ADDR="203.0.113.10").post(
        reverse("admin:login"), {"username": "root", "password": WRONG_PASSWORD}
    )

    assert response.status_code == 200
    assert last_event("auth.login_failed").ip_address == "203.0.113.10"
