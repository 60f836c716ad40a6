"""An alert rule's webhook URL is a credential (a Slack incoming webhook posts to its channel for whoever
holds the URL): it is encrypted at rest, shown back as its host only, kept when the admin's field is left
empty, and removed only when asked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from cryptography.fernet import Fernet
from django.contrib.auth.models import Permission
from django.core import mail
from django.db import connection
from django.test import Client, override_settings

from accounts.roles import Role, role_set
from billing.models import OpsAlertKind, OpsAlertRule
from billing.services.ops_alerts import ops_alert_webhook_url
from billing.tasks import alerts_undelivered_send, ops_alerts_evaluate_task
from tests.factories import UsageRecordFactory, UserFactory
from tests.migrating import migrate, migrated_to

CANARY = "XoXoCanaryWebhookPath9f3e"
URL = f"https://hooks.slack.com/services/T0001/B0002/{CANARY}"
NEW_CANARY = "NewCanaryWebhookPath7a1b"
NEW_URL = f"https://hooks.example.com/services/T0003/B0004/{NEW_CANARY}"


def stored(rule: OpsAlertRule) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT webhook_url FROM billing_opsalertrule WHERE id = %s", [rule.pk])
        return cursor.fetchone()[0]


def make_rule(**fields: object) -> OpsAlertRule:
    return OpsAlertRule.objects.create(
        name="errors", kind=OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), **{"webhook_url": URL, **fields}
    )


def form(rule: OpsAlertRule, **changes: str) -> dict[str, str]:
    data = {
        "name": rule.name,
        "kind": rule.kind,
        "enabled": "on",
        "threshold": str(rule.threshold),
        "window_minutes": str(rule.window_minutes),
        "minimum_requests": str(rule.minimum_requests),
        "minimum_baseline_usd": str(rule.minimum_baseline_usd),
        "clear_after_minutes": str(rule.clear_after_minutes),
        "model_name": "",
        "email_recipients": "",
        "webhook_url": "",
    }
    return {**data, **changes}


def change_url(rule: OpsAlertRule) -> str:
    return f"/admin/billing/opsalertrule/{rule.pk}/change/"


@pytest.fixture
def staff_clients(db, settings) -> dict[str, Client]:
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    clients = {}
    admin = UserFactory(username="root", is_staff=True, is_superuser=True)
    operator = UserFactory(username="night-shift")
    role_set(operator, Role.OPERATOR)
    # Not in the operators' defaults; an admin may grant it, and the URL must stay hidden then too.
    operator.user_permissions.add(*Permission.objects.filter(codename__in=["view_opsalertrule", "change_opsalertrule"]))
    for name, user in (("admin", admin), ("operator", operator)):
        client = Client()
        client.force_login(user)
        clients[name] = client
    return clients


@pytest.mark.django_db
def test_the_webhook_is_encrypted_at_rest_and_never_shown(staff_clients):
    rule = make_rule()
    assert stored(rule).startswith("fernet:") and CANARY not in stored(rule)

    rule.refresh_from_db()
    assert rule.webhook_url.reveal() == URL and ops_alert_webhook_url(rule) == URL
    assert CANARY not in repr(rule.webhook_url) and CANARY not in str(rule.webhook_url)
    assert str(rule.webhook_url) == f"https://hooks.slack.com/…{CANARY[-4:]}"

    for name, client in staff_clients.items():
        page = client.get(change_url(rule))
        assert page.status_code == 200, name
        html = page.content.decode()
        assert CANARY not in html, name
        assert "hooks.slack.com" in html, name  # which webhook it is, for the one who reads the page
        assert CANARY not in client.get("/admin/billing/opsalertrule/").content.decode(), name


@pytest.mark.django_db
def test_the_admin_keeps_replaces_and_removes_the_webhook(staff_clients):
    client = staff_clients["operator"]
    rule = make_rule()

    response = client.post(change_url(rule), form(rule, threshold="20"))
    assert response.status_code == 302, response.content
    rule.refresh_from_db()
    assert rule.threshold == Decimal("20") and rule.webhook_url.reveal() == URL  # left empty: kept

    response = client.post(change_url(rule), form(rule, webhook_url=NEW_URL.removeprefix("https://")))
    assert response.status_code == 302, response.content
    rule.refresh_from_db()
    assert rule.webhook_url.reveal() == NEW_URL  # typed without a scheme: https

    refused = client.post(change_url(rule), form(rule, webhook_url=URL, webhook_url_remove="on"))
    assert refused.status_code == 200
    assert "webhook_url_remove" in refused.context["adminform"].form.errors
    assert URL not in refused.content.decode()  # what was typed is not rendered back
    rule.refresh_from_db()
    assert rule.webhook_url.reveal() == NEW_URL

    response = client.post(change_url(rule), form(rule, webhook_url_remove="on"))
    assert response.status_code == 302, response.content
    rule.refresh_from_db()
    assert not rule.webhook_url and stored(rule) == ""


@pytest.mark.django_db
def test_a_webhook_that_is_no_url_is_refused_without_echoing_it(staff_clients):
    rule = make_rule(webhook_url="")
    response = staff_clients["admin"].post(change_url(rule), form(rule, webhook_url=f"ftp://x/{CANARY}"))
    assert response.status_code == 200
    assert "webhook_url" in response.context["adminform"].form.errors
    assert CANARY not in response.content.decode()
    response = staff_clients["admin"].post(change_url(rule), form(rule, webhook_url="https://x.example/" + "a" * 600))
    assert "webhook_url" in response.context["adminform"].form.errors
    rule.refresh_from_db()
    assert not rule.webhook_url


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_webhooks_already_stored_and_back():
    before, after = [("billing", "0024_daily_usage_scan_mark")], [("billing", "0025_ops_alert_webhook_encrypted")]
    with migrated_to(before):
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM billing_opsalertrule")
            cursor.execute(
                "INSERT INTO billing_opsalertrule (name, kind, enabled, threshold, window_minutes, minimum_requests,"
                " minimum_baseline_usd, model_name, email_recipients, webhook_url, created_at, updated_at)"
                " VALUES ('old', 'error_rate', true, 10, 5, 20, 1, '', '', %s, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP),"
                " ('none', 'latency_p95', true, 10, 5, 20, 1, '', '', '', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
                [URL],
            )
        migrate(after)
        # Only the columns of that migration's state: later ones add fields the table does not have yet there.
        rules = OpsAlertRule.objects.only("name", "webhook_url")
        old, none = rules.get(name="old"), rules.get(name="none")
        assert stored(old).startswith("fernet:") and old.webhook_url.reveal() == URL
        assert stored(none) == "" and not none.webhook_url

        migrate(before)
        assert stored(old) == URL and stored(none) == ""


# A webhook no key decrypts (written under an encryption key since dropped from FIELD_ENCRYPTION_KEYS) -----------

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def slow_requests() -> None:
    for _ in range(2):
        UsageRecordFactory(model_name="m", duration_ms=5000, stream=False, created_at=T0 - timedelta(minutes=1))


def rule_under_a_lost_key(name: str) -> OpsAlertRule:
    with override_settings(FIELD_ENCRYPTION_KEYS=[Fernet.generate_key().decode()]):
        return OpsAlertRule.objects.create(
            name=name,
            kind=OpsAlertKind.LATENCY_P95,
            threshold=Decimal("1000"),
            minimum_requests=2,
            webhook_url=URL,
        )


@pytest.mark.django_db(transaction=True)
def test_a_rule_whose_webhook_no_key_decrypts_still_alerts_by_email_and_the_others_go_on(settings, webhook, caplog):
    """Its row could not even be loaded: the evaluator failed before any rule every minute, and so did the alert
    sweep and the rule's email task; no rule opened an incident. Now each rule is evaluated; the broken one pages
    by email only (not to the global webhook, which is not where it was meant to go), logged once by name."""
    settings.ADMINS = [("", "ops@example.com")]
    OpsAlertRule.objects.all().delete()
    rule_under_a_lost_key("a-broken")
    OpsAlertRule.objects.create(
        name="b-good", kind=OpsAlertKind.LATENCY_P95, threshold=Decimal("1000"), minimum_requests=2
    )
    slow_requests()

    with time_machine.travel(T0, tick=False):
        assert ops_alerts_evaluate_task.apply(throw=True).result == 2
        ops_alerts_evaluate_task.apply(throw=True)
    with time_machine.travel(T0 + timedelta(minutes=5), tick=False):
        alerts_undelivered_send.apply(throw=True)

    subjects = sorted(message.subject for message in mail.outbox)
    assert subjects == ["[llmhub] firing: a-broken (model:m)", "[llmhub] firing: b-good (model:m)"]
    [hook] = webhook.received  # the good rule's only: the broken one's does not go to the global webhook
    assert "b-good" in hook["text"]
    unreadable = [r for r in caplog.records if "cannot be decrypted" in r.getMessage()]
    assert len(unreadable) == 1 and "a-broken" in unreadable[0].getMessage()
    assert all(CANARY not in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_the_admin_shows_a_webhook_no_key_decrypts_and_takes_a_new_one(staff_clients):
    rule = rule_under_a_lost_key("errors")
    token = stored(rule)
    client = staff_clients["admin"]

    assert "cannot be decrypted" in client.get("/admin/billing/opsalertrule/").content.decode()
    page = client.get(change_url(rule))
    assert page.status_code == 200 and "cannot be decrypted" in page.content.decode()

    response = client.post(change_url(rule), form(rule, threshold="20"))  # left empty: kept as it was stored
    assert response.status_code == 302, response.content
    assert stored(rule) == token and OpsAlertRule.objects.get(pk=rule.pk).threshold == Decimal("20")

    response = client.post(change_url(rule), form(rule, threshold="20", webhook_url=NEW_URL))
    assert response.status_code == 302, response.content
    assert OpsAlertRule.objects.get(pk=rule.pk).webhook_url.reveal() == NEW_URL
