"""Incidents: a deployment down, from the probe that found it down to the one that found it back.

One ``Incident`` row is open per deployment at most (a unique constraint on the open ones), so that
whatever the number of workers probing at once, exactly one of them opens it and has its alert sent,
and exactly one closes it and has the recovery sent. Alerts go out after commit through Celery tasks
with retries (``providers.tasks``): an email to the admins (``settings.ADMINS``; without any, the active
superusers with an address) and the Slack-compatible webhook (``LLMHUB_ALERT_WEBHOOK_URL``) the budget
alerts use. The reason stored and sent is a health check's error, already scrubbed of secrets.

The incident records the deliveries made (``delivered``: ``down:email``, ``recovered:webhook``, …) and, while
one is on its way, its claim or failure (``delivery``, ``core.outbox``): a task claims a delivery before it
sends, so the alert sweep (``billing.services.alert_sweep``) can queue again what a broker that was down
never took, without sending anything twice.

The two channels every alert goes out on live here (``alert_email_send``, ``alert_webhook_post``), the
lowest app that sends alerts: ``billing.services.alerts`` re-exports them for the budget and operations
alerts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from urllib.parse import urlsplit

import httpx2
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.timesince import timesince

from core.mail import mail_send_within
from core.outbox import Delivery, DeliveryState, deliveries_unsent, delivery_done, delivery_release, task_queue

from ..models import BreakerOverride, Deployment, Incident
from ..outbound import OutboundRefused, outbound_sync_client


class IncidentEvent:
    """Which of an incident's two alerts."""

    DOWN = "down"
    RECOVERED = "recovered"


# The reason written on a deployment's incident that the operations alerts' evaluator opened from its circuit
# breaker (``billing.services.ops_alerts``): it sees completions failing, which a free health check (the model
# list) cannot, so only the evaluator, or a paid probe (a completion), closes it.
BREAKER_REASON = "Its circuit breaker is open: requests to it are failing."


class WebhookDeliveryError(Exception):
    """The webhook refused or could not be reached. The message never holds the URL (it is a secret)."""


def incident_open(*, deployment_id: int, reason: str, at: datetime) -> Incident | None:
    """Open the deployment's incident, unless one is open already; the new one's alert is sent after commit.
    Returns the incident this call opened, None when it was open before."""
    with transaction.atomic():
        # get_or_create inserts in a savepoint and reads again on the unique constraint's IntegrityError: of
        # two workers racing here, the second waits for the first's commit and finds its row.
        incident, created = Incident.objects.get_or_create(
            deployment_id=deployment_id,
            ended_at=None,
            defaults={"started_at": at, "reason": reason[:500], "delivery": _unsent(IncidentEvent.DOWN)},
        )
        if not created:
            return None
        transaction.on_commit(partial(_deliver, incident.pk, IncidentEvent.DOWN), robust=True)
    return incident


def incident_close(
    *, deployment_id: int, at: datetime, spare_breaker_incident: bool = False, because: str = ""
) -> Incident | None:
    """Close the deployment's open incident, if any; its recovery alert is sent after commit. Returns the
    incident this call closed, None when none was open. With ``spare_breaker_incident`` (a free health check
    passing: the model list answers), one opened from the breaker (``BREAKER_REASON``) is left open: the model
    list answering says nothing of the completions that failed. ``because`` says why it ends when that is no
    recovery (an admin took the deployment out of service): its alert says so instead of "back up"."""
    with transaction.atomic():
        # Locked: a second worker waits here, then no longer finds the row open.
        incident = Incident.objects.select_for_update().filter(deployment_id=deployment_id, ended_at=None).first()
        if incident is None or (spare_breaker_incident and incident.reason == BREAKER_REASON):
            return None
        incident.ended_at = max(at, incident.started_at)
        incident.ended_because = because[:200]
        incident.delivery = {**incident.delivery, **_unsent(IncidentEvent.RECOVERED)}
        incident.save(update_fields=["ended_at", "ended_because", "delivery"])
        transaction.on_commit(partial(_deliver, incident.pk, IncidentEvent.RECOVERED), robust=True)
    return incident


# Why a deployment's incident is closed, not recovered, when an admin took the deployment out of service.
OUT_OF_SERVICE = {
    "enabled": "the deployment was disabled by an admin",
    "model__enabled": "its model was disabled by an admin",
    "provider__enabled": "its provider was disabled by an admin",
    "breaker_override": "its breaker was forced open by an admin",
}


def incidents_out_of_service_close(*, at: datetime, breaker_incidents: bool = False) -> list[str]:
    """Close the open incidents of deployments an admin took out of service, each told once as closed, not
    recovered, saying why (``OUT_OF_SERVICE``); the names of their deployments.

    By default (the health round) every incident of a deployment disabled, or whose model or provider is disabled:
    the round probes none of them, so no probe would ever close it (until 7 December a provider disabled during its
    outage, an operator's first answer to it, left its deployments' incidents open for good). With
    ``breaker_incidents`` (the operations alerts' evaluator) only the incidents it opened from a breaker
    (``BREAKER_REASON``), and those of a deployment whose breaker an admin forced open too: no request reaches it,
    and requests are what close such an incident."""
    taken_out = (
        Q(deployment__enabled=False) | Q(deployment__model__enabled=False) | Q(deployment__provider__enabled=False)
    )
    out = Incident.objects.filter(ended_at__isnull=True)
    if breaker_incidents:
        out = out.filter(reason=BREAKER_REASON)
        taken_out |= Q(deployment__breaker_override=BreakerOverride.OPEN)
    closed = []
    for deployment_id, name, enabled, model_enabled, provider_enabled in out.filter(taken_out).values_list(
        "deployment_id",
        "deployment__name",
        "deployment__enabled",
        "deployment__model__enabled",
        "deployment__provider__enabled",
    ):
        why = (
            "enabled"
            if not enabled
            else "model__enabled"
            if not model_enabled
            else "provider__enabled"
            if not provider_enabled
            else "breaker_override"
        )
        if incident_close(deployment_id=deployment_id, at=at, because=OUT_OF_SERVICE[why]) is not None:
            closed.append(name)
    return closed


def deployment_incidents_keep(*, deployment_id: int, because: str, at: datetime) -> None:
    """Before a deployment is deleted (``because``: "the deployment was deleted", "its model was deleted"): its
    open incident is closed, told once as closed, not recovered, and every incident of it keeps its names, for
    their alerts and the admin once the deployment is gone. Deleted with it, an open incident left on-call a
    "down" page that never resolved, and the admin lost the outage."""
    names = (
        Deployment.objects.filter(pk=deployment_id)
        .values_list("name", "model__name", "provider__name", "upstream_id")
        .first()
    )
    if names is None or not Incident.objects.filter(deployment_id=deployment_id).exists():
        return
    incident_close(deployment_id=deployment_id, at=at, because=because)
    name, model, provider, upstream_id = names
    Incident.objects.filter(deployment_id=deployment_id).update(
        kept_deployment=name, kept_model=model, kept_provider=provider, kept_upstream_id=upstream_id
    )


def _unsent(event: str) -> dict[str, dict[str, str]]:
    """The event's webhook delivery recorded as having nobody to go to when no webhook is set
    (``core.outbox.deliveries_unsent``): one set up later is not sent the incidents of the day before."""
    return {} if settings.LLMHUB_ALERT_WEBHOOK_URL else deliveries_unsent(f"{event}:webhook")


def _deliver(incident_id: int, event: str) -> None:
    # Queued after commit. A broker that cannot take the tasks is logged (``task_queue``) and breaks neither
    # the round of health checks that found the incident nor its row: the alert sweep queues them again.
    from ..tasks import incident_alert_email, incident_alert_webhook

    task_queue(incident_alert_email, incident_id, event, what=f"incident {incident_id}'s {event} email")
    if settings.LLMHUB_ALERT_WEBHOOK_URL:
        task_queue(incident_alert_webhook, incident_id, event, what=f"incident {incident_id}'s {event} webhook")


def incident_deliveries(incident: Incident, events: Iterable[str]) -> Iterator[Delivery]:
    """The deliveries of an incident's ``events`` (down, recovered): the email, and the webhook when one is
    configured (for the alert sweep and the admin's "send again")."""
    from ..tasks import incident_alert_email, incident_alert_webhook

    for event in events:
        what = f"incident {incident.pk}'s {event}"
        args = (incident.pk, event)
        yield Delivery(incident, f"{event}:email", "delivered", incident_alert_email, args, f"{what} email")
        if settings.LLMHUB_ALERT_WEBHOOK_URL:
            yield Delivery(incident, f"{event}:webhook", "delivered", incident_alert_webhook, args, f"{what} webhook")


def incident_events(incident: Incident) -> list[str]:
    """What an incident has had to tell: that the deployment went down, and that it recovered once it did."""
    return [IncidentEvent.DOWN] + ([IncidentEvent.RECOVERED] if incident.ended_at is not None else [])


def incident_duration(incident: Incident, *, now: datetime | None = None) -> str:
    """How long the deployment was (or has been) down, in words: "12 minutes", "1 hour, 5 minutes"."""
    end = incident.ended_at or now or timezone.now()
    if (end - incident.started_at).total_seconds() < 60:
        return "less than a minute"
    return timesince(incident.started_at, end)


@dataclass(frozen=True, slots=True)
class IncidentNames:
    """The names an incident's alerts and the admin show: its deployment's, or those it kept once that was
    deleted."""

    deployment: str
    model: str
    provider: str
    upstream_id: str


def incident_names(incident: Incident) -> IncidentNames:
    deployment = incident.deployment
    if deployment is None:
        return IncidentNames(
            incident.kept_deployment, incident.kept_model, incident.kept_provider, incident.kept_upstream_id
        )
    return IncidentNames(deployment.name, deployment.model.name, deployment.provider.name, deployment.upstream_id)


def incident_subject(incident: Incident) -> str:
    names = incident_names(incident)
    return f"deployment {names.deployment} of model {names.model}"


def incident_alert_text(incident: Incident, event: str) -> str:
    names = incident_names(incident)
    where = f"{incident_subject(incident)} (provider {names.provider}, upstream {names.upstream_id})"
    since = f"{incident.started_at:%Y-%m-%d %H:%M:%S} UTC"
    if event == IncidentEvent.RECOVERED and incident.ended_because:
        return (
            f"llmhub: {where}: its incident is closed, not recovered: {incident.ended_because}, after "
            f"{incident_duration(incident)} down (since {since}). Nothing watches it now."
        )
    if event == IncidentEvent.RECOVERED:
        return f"llmhub: {where} is back up after {incident_duration(incident)} down (since {since})."
    reason = f": {incident.reason}" if incident.reason else ""
    return f"llmhub: {where} is down since {since}{reason}"


def incident_alert_recipients() -> list[str]:
    """``settings.ADMINS`` (names and addresses, or addresses); without any, the active superusers'."""
    listed = [entry if isinstance(entry, str) else entry[1] for entry in settings.ADMINS]
    if listed:
        return listed
    superusers = get_user_model().objects.filter(is_superuser=True, is_active=True).exclude(email="")
    return sorted(set(superusers.values_list("email", flat=True)))


def alert_email_send(*, subject: str, body: str, recipients: Sequence[str]) -> bool:
    """Email ``body`` to ``recipients``, the one way every alert emails; False when there is nobody to send it
    to. SMTP failures raise (the Celery task that called retries). The whole SMTP session is bounded by
    ``LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS`` (``core.mail.mail_send_within``): a mail server trickling its answers
    would otherwise hold the worker past the delivery's claim, and the sweep would send a second copy."""
    if not recipients:
        return False
    mail_send_within(
        seconds=settings.LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS,
        setting="LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS",
        subject=subject,
        body=body,
        recipients=recipients,
    )
    return True


def incident_alert_email_send(*, incident: Incident, event: str) -> bool:
    """Email the alert to the admins and record it delivered; False when there is nobody to send it to."""
    state = "is down"
    if event == IncidentEvent.RECOVERED:
        state = "is no longer watched (not a recovery)" if incident.ended_because else "is back up"
    mark = f"{event}:email"
    sent = alert_email_send(
        subject=f"[llmhub] {incident_subject(incident)} {state}",
        body=incident_alert_text(incident, event),
        recipients=incident_alert_recipients(),
    )
    if sent:
        delivery_done(Incident, incident.pk, mark, delivered_field="delivered")
    else:
        delivery_release(Incident, incident.pk, mark, state=DeliveryState.NOBODY)
    return sent


# The hosts of Slack's incoming webhooks (commercial and GovSlack). How a receiver reads the text is known only
# from its URL: Slack's are always on these hosts, and no other receiver is, so only these get Slack's escaping.
SLACK_WEBHOOK_HOSTS = frozenset({"hooks.slack.com", "hooks.slack-gov.com"})


def webhook_is_slack(url: str) -> bool:
    """Whether ``url`` is Slack's incoming webhook, which reads ``&``, ``<`` and ``>`` in the text as markup."""
    return urlsplit(url).hostname in SLACK_WEBHOOK_HOSTS


def slack_text_escape(text: str) -> str:
    """``text`` as Slack's message text shows it as written: ``&``, ``<`` and ``>`` escaped as Slack asks
    (https://api.slack.com/reference/surfaces/formatting#escaping), and nothing else. Unescaped, a name an admin
    or a user wrote (``<!channel>``, ``<http://x|click>``) or an upstream's words in a reason would page a channel
    or render a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def alert_webhook_post(*, url: str, text: str) -> None:
    """POST ``{"text": text}`` to a Slack-compatible webhook, ``text`` escaped as Slack asks
    (``slack_text_escape``) when the receiver is Slack's (``webhook_is_slack``) and as written to any other
    (which would show ``&amp;``), under the outbound policy every provider call obeys (the URL is set by an
    operator, but the address its name resolves to is not); a redirect is a failure. Raises
    ``WebhookDeliveryError``, whose message never holds the URL.

    Each step (connect, write, read) has 10 s, and the whole exchange ``LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS``:
    a receiver trickling its answer a byte at a time would otherwise hold the worker as long as it liked, and,
    past the delivery's claim, have the sweep send a second copy. Past the deadline it is a failed attempt,
    retried as any other."""
    allowed = settings.LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS
    deadline = time.monotonic() + allowed
    try:
        with outbound_sync_client(url=url, timeout=10.0, follow_redirects=False, deadline=deadline) as client:
            shown = slack_text_escape(text) if webhook_is_slack(url) else text
            response = client.post(url, json={"text": shown})
    except OutboundRefused:
        raise WebhookDeliveryError(
            "the alert webhook's address is refused by the outbound policy (see LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS)"
        ) from None
    except httpx2.TimeoutException as exc:
        if time.monotonic() < deadline:
            raise WebhookDeliveryError(f"the alert webhook could not be reached ({type(exc).__name__})") from None
        raise WebhookDeliveryError(
            f"the alert webhook did not answer within {allowed:g} s (LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS)"
        ) from None
    except httpx2.HTTPError as exc:
        raise WebhookDeliveryError(f"the alert webhook could not be reached ({type(exc).__name__})") from None
    if response.status_code >= 300:
        raise WebhookDeliveryError(f"the alert webhook answered HTTP {response.status_code}")


def incident_alert_webhook_send(*, incident: Incident, event: str, url: str) -> None:
    alert_webhook_post(url=url, text=incident_alert_text(incident, event))
    delivery_done(Incident, incident.pk, f"{event}:webhook", delivered_field="delivered")
