"""Guessing passwords on the sign-in forms: after a few failures for one name from one address (and many from
one address, whatever the names), the form refuses to check more for a while, saying so, even the right
password; other addresses and names are not held back, and the cache being down does not stop sign-ins."""

from __future__ import annotations

import pytest
import time_machine
from django.test import Client

from accounts.signin_throttle import SIGNIN_WINDOW_SECONDS
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "pw-for-tests-123"


@pytest.fixture
def clock():
    with time_machine.travel("2026-06-10 12:00:00+00:00", tick=False) as traveller:
        yield traveller


def sign_in(path: str, username: str, password: str, address: str = "203.0.113.7"):
    return Client(REMOTE_ADDR=address).post(path, {"username": username, "password": password})


@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
def test_guessing_a_password_is_stopped_even_with_the_right_one(path, clock, settings):
    settings.LLMHUB_SIGNIN_FAILURES_PER_NAME = 5
    UserFactory(username="alice", is_staff=True)
    for attempt in range(5):
        response = sign_in(path, "alice", f"guess-{attempt}")
        assert response.status_code == 200 and "_auth_user_id" not in response.wsgi_request.session

    response = sign_in(path, "alice", PASSWORD)

    assert response.status_code == 200, response.get("Location")
    assert "Too many failed sign-ins" in response.content.decode()
    assert "_auth_user_id" not in response.wsgi_request.session
    # Another address, and the same address once the window has passed, sign in.
    assert sign_in(path, "alice", PASSWORD, address="198.51.100.9").status_code == 302
    clock.shift(SIGNIN_WINDOW_SECONDS)
    assert sign_in(path, "alice", PASSWORD).status_code == 302


def test_one_address_spraying_many_names_is_stopped(clock, settings):
    settings.LLMHUB_SIGNIN_FAILURES_PER_ADDRESS = 8
    UserFactory(username="zed")
    for attempt in range(8):
        sign_in("/accounts/login/", f"name-{attempt}", "Winter2026!")

    response = sign_in("/accounts/login/", "zed", PASSWORD)

    assert "Too many failed sign-ins" in response.content.decode()
    assert sign_in("/accounts/login/", "zed", PASSWORD, address="198.51.100.9").status_code == 302


def test_the_addresses_of_one_ipv6_network_count_as_one_address(clock, settings):
    """An IPv6 host holds a whole /64 (2**64 addresses), and took a new one for each guess: neither the name's
    limit nor the address's ever held it back. Its addresses count as one, its IPv4 address mapped into IPv6 as
    that IPv4 address; another /64 is another address."""
    settings.LLMHUB_SIGNIN_FAILURES_PER_NAME = 5
    UserFactory(username="alice")
    for attempt in range(5):
        sign_in("/accounts/login/", "alice", f"guess-{attempt}", address=f"2001:db8:0:7::{attempt + 1:x}")

    for address in ("2001:db8:0:7:ffff:ffff:ffff:ffff", "2001:DB8:0:7::99"):
        assert "Too many failed sign-ins" in sign_in("/accounts/login/", "alice", PASSWORD, address).content.decode()
    assert sign_in("/accounts/login/", "alice", PASSWORD, address="2001:db8:0:8::1").status_code == 302

    for attempt in range(5):
        sign_in("/accounts/login/", "alice", f"guess-{attempt}", address="::ffff:198.51.100.20")
    assert (
        "Too many failed sign-ins" in sign_in("/accounts/login/", "alice", PASSWORD, "198.51.100.20").content.decode()
    )


def test_a_success_clears_the_names_count(clock, settings):
    settings.LLMHUB_SIGNIN_FAILURES_PER_NAME = 3
    UserFactory(username="bob")
    for _ in range(2):
        sign_in("/accounts/login/", "bob", "typo")
    assert sign_in("/accounts/login/", "bob", PASSWORD).status_code == 302
    for _ in range(2):
        sign_in("/accounts/login/", "bob", "typo")
    assert sign_in("/accounts/login/", "bob", PASSWORD).status_code == 302


def test_with_the_cache_down_sign_in_still_works(settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}
    }
    UserFactory(username="carol")
    assert sign_in("/accounts/login/", "carol", "wrong").status_code == 200
    assert sign_in("/accounts/login/", "carol", PASSWORD).status_code == 302
