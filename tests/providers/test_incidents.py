"""Incidents: a deployment the health checks find down opens one, with one alert (email to the admins and the
Slack-compatible webhook, a real HTTP server started here); back up, it is closed with one recovery alert.
Probes run against the fake upstream over real HTTP; the committed transactions let the alerts go out."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core import mail
from django.db import connection

from billing.tasks import alerts_undelivered_send
from providers.models import Incident
from providers.services.incidents import incident_open
from providers.tasks import providers_health_check_all
from tests.conftest import free_port
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.providers.health_probes import breakers_closed_after, set_fault  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("breakers_closed_after")]

KEY = "sk-incident-secret-key-0123456789abcdefgh"
START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def admins(settings) -> list[str]:
    settings.ADMINS = [("Ops", "ops@example.com")]
    return ["ops@example.com"]


def test_down_opens_one_incident_with_one_alert_and_back_up_closes_it_with_one_recovery(fake_upstream, webhook, admins):
    provider = ProviderFactory(name="east", base_url=fake_upstream.base_url + "/v1")
    deployment = ModelFactory(name="gpt-4o-mini", provider=provider, upstream_id="fake-gpt-4o-mini").deployments.get()

    with time_machine.travel(START, tick=False) as clock:
        providers_health_check_all.delay().get()
        assert not Incident.objects.exists() and mail.outbox == []

        set_fault(provider, "503")
        providers_health_check_all.delay().get()  # one failing probe: the breaker opens, nobody is woken
        assert not Incident.objects.exists() and mail.outbox == [] and webhook.received == []

        clock.shift(timedelta(minutes=5))
        providers_health_check_all.delay().get()  # the second in a row: down
        incident = Incident.objects.get()
        assert (incident.deployment, incident.started_at, incident.ended_at) == (
            deployment,
            START + timedelta(minutes=5),
            None,
        )
        assert "overloaded" in incident.reason
        assert len(mail.outbox) == 1 and len(webhook.received) == 1
        assert mail.outbox[0].to == admins
        assert mail.outbox[0].subject == "[llmhub] deployment east of model gpt-4o-mini is down"
        assert webhook.received[0]["text"].startswith(
            "llmhub: deployment east of model gpt-4o-mini (provider east, upstream fake-gpt-4o-mini) is down since "
            "2026-12-01 09:05:00 UTC: "
        )

        for _ in range(3):  # still down: nothing more
            clock.shift(timedelta(minutes=5))
            providers_health_check_all.delay().get()
        assert Incident.objects.count() == 1 and len(mail.outbox) == 1 and len(webhook.received) == 1

        set_fault(provider, None)
        clock.shift(timedelta(minutes=5))
        providers_health_check_all.delay().get()  # back up, 20 minutes after it went down
        incident.refresh_from_db()
        assert incident.ended_at == START + timedelta(minutes=25)
        assert len(mail.outbox) == 2 and len(webhook.received) == 2
        assert mail.outbox[1].subject == "[llmhub] deployment east of model gpt-4o-mini is back up"
        assert webhook.received[1]["text"] == (
            "llmhub: deployment east of model gpt-4o-mini (provider east, upstream fake-gpt-4o-mini) is back up "
            "after 20\xa0minutes down (since 2026-12-01 09:05:00 UTC)."
        )

        clock.shift(timedelta(minutes=5))
        providers_health_check_all.delay().get()
    assert Incident.objects.count() == 1 and len(mail.outbox) == 2 and len(webhook.received) == 2


def test_two_rounds_in_the_same_tick_are_one_failure_not_an_incident(fake_upstream, webhook, admins):
    """Two beats (or a beat and a manual check) seconds apart both failed on one blip: two failing probes "in a
    row" opened an incident and paged at once. Failures count toward an incident once per round: probes less than
    LLMHUB_HEALTH_ROUND_SECONDS apart are one; the next round, minutes later, still failing, opens it."""
    provider = ProviderFactory(name="east", base_url=fake_upstream.base_url + "/v1")
    deployment = ModelFactory(name="gpt-4o-mini", provider=provider, upstream_id="fake-gpt-4o-mini").deployments.get()
    set_fault(provider, "503")

    with time_machine.travel(START, tick=False) as clock:
        providers_health_check_all.delay().get()
        clock.shift(timedelta(seconds=3))
        providers_health_check_all.delay().get()  # a second beat in the same tick
        clock.shift(timedelta(seconds=40))
        providers_health_check_all.delay().get()  # an operator's check, within the minute
        assert deployment.health_checks.filter(ok=False).count() == 3  # each probe kept, for the admin
        assert not Incident.objects.exists() and mail.outbox == [] and webhook.received == []

        clock.shift(timedelta(minutes=5))
        providers_health_check_all.delay().get()  # the next round: down
    incident = Incident.objects.get()
    assert incident.started_at == START + timedelta(seconds=43, minutes=5) and incident.ended_at is None
    assert len(mail.outbox) == 1 and len(webhook.received) == 1


def test_a_deployment_down_again_opens_a_new_incident(fake_upstream, admins, settings):
    settings.LLMHUB_HEALTH_INCIDENT_AFTER_FAILURES = 1
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    ModelFactory(provider=provider)

    for fault in ("503", None, "500", None):
        set_fault(provider, fault)
        providers_health_check_all.delay().get()

    assert [i.ended_at is not None for i in Incident.objects.order_by("started_at", "pk")] == [True, True]
    assert [m.subject.rsplit(" ", 2)[-2:] for m in mail.outbox] == [
        ["is", "down"],
        ["back", "up"],
        ["is", "down"],
        ["back", "up"],
    ]


def test_two_rounds_at_once_open_one_incident_and_send_one_alert(fake_upstream, webhook, admins, settings):
    settings.LLMHUB_HEALTH_INCIDENT_AFTER_FAILURES = 1
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1", extra_headers={"x-fake-fault": "503"})
    deployment = ModelFactory(provider=provider).deployments.get()
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait()
            providers_health_check_all()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert deployment.health_checks.filter(ok=False).count() == 2  # both probed
    assert Incident.objects.count() == 1
    assert len(mail.outbox) == 1 and len(webhook.received) == 1

    set_fault(provider, None)
    threads = [threading.Thread(target=worker) for _ in range(2)]
    start.reset()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert Incident.objects.get().ended_at is not None
    assert len(mail.outbox) == 2 and len(webhook.received) == 2


def test_alerts_never_carry_the_key_the_provider_quoted_back(fake_upstream, webhook, admins, settings):
    settings.LLMHUB_HEALTH_INCIDENT_AFTER_FAILURES = 1
    # The fake quotes an unknown fault name back in its error; here the name is the provider's key.
    provider = ProviderFactory(
        base_url=fake_upstream.base_url + "/v1", api_key=KEY, extra_headers={"x-fake-fault": KEY}
    )
    ModelFactory(provider=provider)

    providers_health_check_all.delay().get()

    texts = [mail.outbox[0].subject, mail.outbox[0].body, webhook.received[0]["text"], Incident.objects.get().reason]
    assert all("Unknown fake fault" in text for text in texts[1:])
    assert not any(KEY in text or KEY[-12:] in text for text in texts)


def test_without_admins_the_superusers_are_emailed_and_a_failing_webhook_is_retried(fake_upstream, webhook, settings):
    settings.LLMHUB_HEALTH_INCIDENT_AFTER_FAILURES = 1
    settings.ADMINS = []
    UserFactory(username="root", email="root@example.com", is_superuser=True, is_staff=True)
    UserFactory(username="alice", email="alice@example.com")
    ModelFactory(provider=ProviderFactory(base_url=f"http://127.0.0.1:{free_port()}/v1"))
    webhook.fail_next = 2

    providers_health_check_all.delay().get()

    assert [message.to for message in mail.outbox] == [["root@example.com"]]
    assert len(webhook.received) == 1 and "could not reach" in webhook.received[0]["text"]


def test_the_admin_lists_open_incidents_first(client, fake_upstream):
    admin = UserFactory(username="admin", is_superuser=True, is_staff=True)
    client.force_login(admin)
    provider = ProviderFactory(name="west", api_key=KEY)
    old, recent = (ModelFactory(name=name, provider=provider).deployments.get() for name in ("old", "recent"))
    ongoing = ModelFactory(name="ongoing", provider=provider).deployments.get()
    Incident.objects.create(
        deployment=old, started_at=START - timedelta(days=2), ended_at=START - timedelta(days=2) + timedelta(hours=1)
    )
    Incident.objects.create(
        deployment=recent, started_at=START, ended_at=START + timedelta(minutes=7), reason="HTTP 503"
    )
    Incident.objects.create(deployment=ongoing, started_at=START - timedelta(days=5), reason="could not reach")

    with time_machine.travel(START + timedelta(minutes=30), tick=False):
        page = client.get("/admin/providers/incident/")

    assert page.status_code == 200
    html = page.content.decode()
    rows = [html.index(f">{name}<") for name in ("ongoing", "recent", "old")]
    assert rows == sorted(rows)
    assert "5\xa0days (ongoing)" in html and "7\xa0minutes" in html and "1\xa0hour" in html
    assert KEY not in html and KEY[-12:] not in html
    assert client.get("/admin/providers/incident/add/").status_code == 403


def test_a_mail_server_that_is_down_neither_stops_the_round_nor_the_webhook(fake_upstream, webhook, admins, settings):
    settings.LLMHUB_HEALTH_INCIDENT_AFTER_FAILURES = 1
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nothing listens: refused, retried
    down = ProviderFactory(base_url=fake_upstream.base_url + "/v1", extra_headers={"x-fake-fault": "503"})
    up = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    ModelFactory(provider=down)
    ModelFactory(provider=up)

    assert providers_health_check_all.delay().get() == {down.name: False, up.name: True}

    assert Incident.objects.count() == 1 and len(webhook.received) == 1


def test_names_in_a_slack_alert_are_escaped_as_slack_asks_and_the_email_keeps_them_as_written(slack_webhook, admins):
    """Slack reads ``<…>`` in a message's text as a mention or a link and ``&`` as the start of an escape: an
    upstream id ``<!channel>`` (admin-written) paged the whole channel, and a health check's reason (the upstream's
    words) could render ``<http://x|click here>`` as a link. Slack's webhook gets its text escaped as Slack asks
    (``&amp;``, ``&lt;``, ``&gt;``, nothing else), so it shows what was written; the email is plain text and keeps
    it as is."""
    provider = ProviderFactory(name="east & west")
    deployment = ModelFactory(name="gpt <b>", provider=provider, upstream_id="<!channel>").deployments.get()

    incident_open(deployment_id=deployment.pk, reason="see <http://evil.example|click here> &amp; more", at=START)

    [posted] = slack_webhook.received
    assert posted["text"] == (
        "llmhub: deployment east &amp; west of model gpt &lt;b&gt; (provider east &amp; west, upstream "
        "&lt;!channel&gt;) is down since 2026-12-01 09:00:00 UTC: see &lt;http://evil.example|click here&gt; "
        "&amp;amp; more"
    )
    [sent] = mail.outbox
    assert "upstream <!channel>" in sent.body and "<http://evil.example|click here> &amp; more" in sent.body


def test_a_webhook_that_is_not_slack_gets_the_text_as_written(webhook, admins):
    """Slack's escaping is Slack's markup: a receiver that is not Slack (a JSON endpoint, an incident tool) read
    ``&amp;`` and ``&lt;`` in the text as written, so ``east & west`` arrived as ``east &amp; west``. Only
    Slack's own webhook host gets the text escaped; any other receiver gets the same JSON with the text as is."""
    provider = ProviderFactory(name="east & west")
    deployment = ModelFactory(name="gpt <b>", provider=provider, upstream_id="<!channel>").deployments.get()

    incident_open(deployment_id=deployment.pk, reason="see <http://evil.example|click here> &amp; more", at=START)

    [posted] = webhook.received
    assert posted == {
        "text": "llmhub: deployment east & west of model gpt <b> (provider east & west, upstream <!channel>) is "
        "down since 2026-12-01 09:00:00 UTC: see <http://evil.example|click here> &amp; more"
    }


@pytest.mark.parametrize(
    ("deleted", "because"), [("deployment", "the deployment was deleted"), ("model", "its model was deleted")]
)
def test_a_deployment_deleted_while_down_has_its_incident_closed_once_as_no_recovery(
    deleted, because, client, webhook, admins
):
    """Deleting a deployment that was down, or the model it serves, deleted its open incident with it (a
    cascade), silently: on-call kept a "down" page that never resolved, and the admin lost the outage. The
    incident now outlives its deployment, keeping its names, and is closed first, told once as no recovery; the
    alert sweep sends nothing more, and the admin still lists it."""
    provider = ProviderFactory(name="east")
    model = ModelFactory(name="gpt-4o-mini", provider=provider, upstream_id="fake-gpt-4o-mini")
    deployment = model.deployments.get()
    where = "deployment east of model gpt-4o-mini"

    with time_machine.travel(START, tick=False) as clock:
        incident_open(deployment_id=deployment.pk, reason="HTTP 503", at=START)
        clock.shift(timedelta(minutes=20))
        {"deployment": deployment, "model": model}[deleted].delete()
        clock.shift(timedelta(minutes=5))  # past the sweep's grace: it finds nothing left to send
        alerts_undelivered_send()

    incident = Incident.objects.get()
    assert (incident.deployment, incident.ended_at, incident.ended_because) == (
        None,
        START + timedelta(minutes=20),
        because,
    )
    assert [m.subject for m in mail.outbox] == [
        f"[llmhub] {where} is down",
        f"[llmhub] {where} is no longer watched (not a recovery)",
    ]
    assert [posted["text"] for posted in webhook.received][1:] == [
        f"llmhub: {where} (provider east, upstream fake-gpt-4o-mini): its incident is closed, not recovered: "
        f"{because}, after 20\xa0minutes down (since 2026-12-01 09:00:00 UTC). Nothing watches it now."
    ]
    assert len(webhook.received) == 2

    client.force_login(UserFactory(username="admin", is_superuser=True, is_staff=True))
    html = client.get("/admin/providers/incident/").content.decode()
    assert ">east (deleted)<" in html and ">gpt-4o-mini<" in html and "20\xa0minutes" in html
