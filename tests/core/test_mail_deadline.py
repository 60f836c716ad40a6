"""Every email's SMTP session is bounded by one deadline, not only alerts' (``core.mail.DeadlineSmtpBackend``): a
mail server trickling its answers a byte at a time keeps each read within ``EMAIL_TIMEOUT``, and held the worker
(or the request) sending a user's notice or a password reset as long as it liked."""

from __future__ import annotations

import logging

import pytest

from core.mail import MailDeadlineExceeded
from providers.fields import Secret
from providers.models import CredentialStatus, ProviderCredential
from providers.services.credentials import provider_credential_invalid_notify
from tests.factories import ProviderFactory, UserFactory
from tests.trickling import TricklingMailServer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def trickling_mail_server(settings):
    server = TricklingMailServer()
    settings.EMAIL_BACKEND = "core.mail.DeadlineSmtpBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", server.port, 10
    settings.LLMHUB_EMAIL_DEADLINE_SECONDS = 0.3
    yield server
    server.close()


def refused_key() -> ProviderCredential:
    return ProviderCredential.objects.create(
        owner=UserFactory(username="olga", email="olga@example.com"),
        provider=ProviderFactory(name="acme"),
        api_key="sk-olga-0000000000001234",
        hint=Secret("sk-olga-0000000000001234").hint,
        status=CredentialStatus.INVALID,
        status_detail="the provider answered 401",
        invalid_notice_due=True,
    )


def test_a_users_key_notice_to_a_trickling_mail_server_is_cut_at_the_deadline_and_stays_due(trickling_mail_server):
    credential = refused_key()

    with pytest.raises(MailDeadlineExceeded, match=r"within 0\.3 s \(LLMHUB_EMAIL_DEADLINE_SECONDS\)"):
        provider_credential_invalid_notify(credential=credential)

    assert trickling_mail_server.accepted == 0
    credential.refresh_from_db()
    assert credential.invalid_notice_due  # the task's retry, or the next daily check, sends it


def test_a_users_key_notice_to_a_slow_mail_server_within_the_deadline_is_sent_once(trickling_mail_server, settings):
    settings.LLMHUB_EMAIL_DEADLINE_SECONDS = 60
    trickling_mail_server.pause = 0.005
    credential = refused_key()

    assert provider_credential_invalid_notify(credential=credential)

    assert (trickling_mail_server.sessions, trickling_mail_server.accepted) == (1, 1)
    credential.refresh_from_db()
    assert not credential.invalid_notice_due


def test_a_password_reset_to_a_trickling_mail_server_is_cut_at_the_deadline(trickling_mail_server, client, caplog):
    """Django's reset form logs a failed send and answers as if it went (it never says whether an address exists)."""
    UserFactory(username="pia", email="pia@example.com")

    with caplog.at_level(logging.ERROR, logger="django.contrib.auth"):
        response = client.post("/accounts/password_reset/", {"email": "pia@example.com"})

    assert response.status_code == 302
    assert trickling_mail_server.sessions == 1 and trickling_mail_server.accepted == 0
    assert any(isinstance(record.exc_info[1], MailDeadlineExceeded) for record in caplog.records if record.exc_info)
