"""Budget alerts: at 50 %, 80 % and 100 % of a budget or token quota, once per threshold, limit and period.

The ``BudgetAlert`` row is the "once": its unique constraint lets exactly one settlement, in whatever
process, record a crossing. The limit is part of it: a budget raised after its alerts fired has thresholds
of its own, and those the spend has not reached yet fire when it does, in the same period (those it is
already past are never crossed, so they stay quiet). Reconciliation raises the alerts a settlement missed
(a lost settle whose spend only the ledger shows) through the same rows, so a threshold that fired never
fires again.
Delivery happens after commit in Celery tasks (email to the user, or the key's owner; the
Slack-compatible webhook when ``LLMHUB_ALERT_WEBHOOK_URL`` is set), with retries. Raising an alert never
fails its caller (a settlement, a reconciliation): a broker that cannot take the tasks is logged, and the
alert sweep (``alert_sweep``) queues the deliveries the row does not record as made. Each task claims its
delivery on the row before sending (``core.outbox``), so the sweep's copy and the normal one send once.

The channels themselves (``alert_email_send``, ``alert_webhook_send``) are shared by every alert: these,
the operations alerts (``ops_alerts``) and the deployment incidents of ``providers.services.incidents``
(where both live, as the lowest app that sends alerts), so an email or a webhook call is made, refused and
retried one way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import partial

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from core.outbox import DeliveryState, deliveries_unsent, delivery_done, delivery_release, task_queue
from providers.services.incidents import WebhookDeliveryError, alert_email_send, alert_webhook_post

from ..models import ApiKey, BudgetAlert, BudgetMetric, ScopeKind
from ..selectors import UNRESTRICTED, KeyLimits, user_limits_sync
from .budgets import THRESHOLDS, CounterRef, CounterSpec, counter_specs, usd

__all__ = ["WebhookDeliveryError", "alert_email_send", "alert_webhook_send"]


# CHANNELS: every alert's email and webhook go out through these two (``alert_email_send`` is providers').


def alert_webhook_send(*, url: str, text: str) -> None:
    """POST ``{"text": text}`` to a Slack-compatible webhook under the outbound policy every provider call
    obeys (the URL is set by an operator, but the address its name resolves to is not); a redirect is a
    failure. Raises ``WebhookDeliveryError``, whose message never holds the URL."""
    alert_webhook_post(url=url, text=text)


@dataclass(frozen=True, slots=True)
class Crossing:
    spec: CounterSpec
    threshold: int
    spent: Decimal


def budget_crossings(*, spec: CounterSpec, before: Decimal, after: Decimal) -> list[Crossing]:
    """Thresholds this settlement took the counter across (a big request may cross several)."""
    if spec.limit <= 0:
        return []
    return [Crossing(spec, t, after) for t in THRESHOLDS if before < spec.limit * t / 100 <= after]


def budget_alerts_raise(*, crossings: Sequence[Crossing], user_id: int) -> list[BudgetAlert]:
    """Record each crossing unless this threshold of this limit already fired in this period; deliver the new
    ones."""
    created = []
    for crossing in crossings:
        ref = crossing.spec.ref
        try:
            with transaction.atomic():
                alert = BudgetAlert.objects.create(
                    scope_kind=ref.scope_kind,
                    scope_id=ref.scope_id,
                    user_id=user_id,
                    api_key_id=ref.scope_id if ref.scope_kind == ScopeKind.KEY else None,
                    metric=ref.metric,
                    period=ref.period,
                    period_start=ref.period_start,
                    threshold=crossing.threshold,
                    limit=crossing.spec.limit,
                    spent=crossing.spent,
                    delivery={} if settings.LLMHUB_ALERT_WEBHOOK_URL else deliveries_unsent("webhook"),
                )
        except IntegrityError:
            continue  # fired already in this period
        created.append(alert)
        # Robust on top of ``task_queue`` (which never raises for a broker that is down): whatever else goes
        # wrong queueing one alert neither fails the settlement nor stops the next crossing being recorded.
        transaction.on_commit(partial(_deliver, alert.pk), robust=True)
    return created


def budget_correction_alerts_raise(*, ref: CounterRef, before: Decimal, after: Decimal) -> list[BudgetAlert]:
    """Alerts for the thresholds that reconciliation took a counter across when it moved it from ``before``
    up to the ledger's ``after``: the spend it missed crossed them unseen. A correction down fires nothing."""
    if after <= before:
        return []
    charged = _counter_spec_now(ref)
    if charged is None:
        return []
    spec, user_id = charged
    return budget_alerts_raise(crossings=budget_crossings(spec=spec, before=before, after=after), user_id=user_id)


def _counter_spec_now(ref: CounterRef) -> tuple[CounterSpec, int] | None:
    """The counter as admission charges it now (its limit and title, as a settlement's alert has them) and
    the user its alerts go to; None when nothing limits it any more (the limit is gone, the key's budget
    period changed, the key was deleted)."""
    if ref.scope_kind == ScopeKind.KEY:
        row = ApiKey.objects.filter(pk=ref.scope_id).values("user_id", "budget_usd", "budget_period").first()
        if row is None:
            return None
        user_id = row["user_id"]
        key = KeyLimits(budget_usd=row["budget_usd"], budget_period=row["budget_period"], rpm=None, tpm=None)
        specs = counter_specs(
            user_id=user_id, api_key_id=ref.scope_id, user=UNRESTRICTED, key=key, now=ref.period_start
        )
    else:
        user_id = ref.scope_id
        limits = user_limits_sync(user_id)
        specs = counter_specs(user_id=user_id, api_key_id=None, user=limits, key=None, now=ref.period_start)
    spec = next((spec for spec in specs if spec.key == ref.key), None)
    return None if spec is None else (spec, user_id)


def _deliver(alert_id: int) -> None:
    from ..tasks import budget_alert_email, budget_alert_webhook

    task_queue(budget_alert_email, alert_id, what=f"budget alert {alert_id}'s email")
    if settings.LLMHUB_ALERT_WEBHOOK_URL:
        task_queue(budget_alert_webhook, alert_id, what=f"budget alert {alert_id}'s webhook")


def _amount(metric: str, value: Decimal) -> str:
    return usd(value) if metric == BudgetMetric.COST else f"{int(value):,} tokens"


def alert_subject(alert: BudgetAlert) -> str:
    """What reached the threshold, in words: "alice's monthly budget", "API key sk-llmhub-ab… (ci)"."""
    owner = alert.user.get_username() if alert.user else "a deleted user"
    if alert.scope_kind == ScopeKind.KEY:
        key = ApiKey.objects.filter(pk=alert.scope_id).only("prefix", "name").first()
        name = f"{key.prefix}… ({key.name})" if key else f"#{alert.scope_id}"
        return f"the {alert.period} budget of API key {name} of {owner}"
    if alert.metric == BudgetMetric.TOKENS:
        return f"{owner}'s daily token quota"
    return f"{owner}'s monthly budget"


def alert_text(alert: BudgetAlert) -> str:
    since = "" if alert.period == "total" else f" in the period that began {alert.period_start:%Y-%m-%d}"
    return (
        f"llmhub: {alert_subject(alert)} has reached {alert.threshold}%: "
        f"{_amount(alert.metric, alert.spent)} of {_amount(alert.metric, alert.limit)} used{since}."
    )


def _mark_delivered(alert_id: int, channel: str) -> None:
    also = {"sent_at": timezone.now()} if channel == "email" else {}
    delivery_done(BudgetAlert, alert_id, channel, delivered_field="channels", **also)


def budget_alert_email_send(*, alert: BudgetAlert) -> bool:
    """Email the user (a key's owner for a key's budget); False when they have no address."""
    recipient = alert.user.email if alert.user else ""
    body = alert_text(alert)
    if alert.threshold >= 100:
        body += "\n\nRequests are refused until the period ends or the limit is raised."
    subject = f"[llmhub] {alert_subject(alert)} is at {alert.threshold}%"
    if not alert_email_send(subject=subject, body=body, recipients=[recipient] if recipient else []):
        delivery_release(BudgetAlert, alert.pk, "email", state=DeliveryState.NOBODY)
        return False
    _mark_delivered(alert.pk, "email")
    return True


def budget_alert_webhook_send(*, alert: BudgetAlert, url: str) -> None:
    """POST the alert to the webhook (``alert_webhook_send``: the outbound policy applies, a redirect fails)."""
    alert_webhook_send(url=url, text=alert_text(alert))
    _mark_delivered(alert.pk, "webhook")
