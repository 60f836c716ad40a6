"""Flooding a mailbox through the password reset form: after a few reset emails to one address (whoever asks),
or many asks from one client address (whatever the emails), no more is sent until the window ends. The page
answers every ask the same way, sent or not, for an email with an account or without, so it tells nobody
whether the email has an account; and the cache being down does not stop resets."""

from __future__ import annotations

import pytest
import time_machine
from django.core import mail
from django.test import Client

from accounts.reset_throttle import PASSWORD_RESET_WINDOW_SECONDS
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def locmem_mail(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


@pytest.fixture
def clock():
    with time_machine.travel("2026-06-10 12:00:00+00:00", tick=False) as traveller:
        yield traveller


def ask_reset(email: str, address: str = "203.0.113.7"):
    response = Client(REMOTE_ADDR=address).post("/accounts/password_reset/", {"email": email})
    return response.status_code, response.get("Location")


def test_one_mailbox_gets_only_a_few_reset_emails_whoever_asks(clock, settings):
    settings.LLMHUB_PASSWORD_RESETS_PER_EMAIL = 3
    UserFactory(username="alice", email="alice@example.com")

    answers = {ask_reset("Alice@Example.com", address=f"198.51.100.{n}") for n in range(8)}

    assert answers == {(302, "/accounts/password_reset/done/")}
    assert [message.to for message in mail.outbox] == [["alice@example.com"]] * 3
    # Another mailbox is not held back, and this one gets mail again once the window has passed.
    UserFactory(username="bob", email="bob@example.com")
    assert ask_reset("bob@example.com", address="198.51.100.1") == (302, "/accounts/password_reset/done/")
    assert len(mail.outbox) == 4
    clock.shift(PASSWORD_RESET_WINDOW_SECONDS)
    ask_reset("alice@example.com")
    assert len(mail.outbox) == 5


def test_one_address_asking_for_many_mailboxes_is_stopped(clock, settings):
    settings.LLMHUB_PASSWORD_RESETS_PER_ADDRESS = 4
    for n in range(6):
        UserFactory(username=f"user{n}", email=f"user{n}@example.com")

    answers = {ask_reset(f"user{n}@example.com") for n in range(6)}

    assert answers == {(302, "/accounts/password_reset/done/")}
    assert len(mail.outbox) == 4
    ask_reset("user5@example.com", address="198.51.100.9")
    assert len(mail.outbox) == 5


def test_the_answer_is_the_same_for_an_email_without_an_account_and_when_held_back(clock, settings):
    settings.LLMHUB_PASSWORD_RESETS_PER_EMAIL = 1
    UserFactory(username="carol", email="carol@example.com")

    first, held_back = ask_reset("carol@example.com"), ask_reset("carol@example.com")
    nobody, nobody_again = ask_reset("nobody@example.com"), ask_reset("nobody@example.com")

    assert first == held_back == nobody == nobody_again == (302, "/accounts/password_reset/done/")
    assert len(mail.outbox) == 1
    page = Client().get("/accounts/password_reset/done/").content.decode()
    assert "carol" not in page and "nobody" not in page


def test_with_the_cache_down_resets_are_still_sent(settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}
    }
    settings.LLMHUB_PASSWORD_RESETS_PER_EMAIL = 1
    UserFactory(username="dave", email="dave@example.com")
    for _ in range(2):
        assert ask_reset("dave@example.com") == (302, "/accounts/password_reset/done/")
    assert len(mail.outbox) == 2
