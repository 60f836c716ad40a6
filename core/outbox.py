"""Deliveries recorded on the row that must be told, so that none is lost to a broker that is down
(docs/alerts.md, "Delivery").

An alert's row (a budget alert, an operations incident, a deployment's incident) is committed first; its
deliveries (``"email"``, ``"open:webhook"``, …) go out through Celery tasks. Each row keeps the deliveries
made in a list (``delivered_field``) and, in its ``delivery`` dict, what became of the others: a task
*claims* a delivery under the row's lock before it sends (so that of two tasks, the normal one and the
sweep's, or two sweeps', one sends), records it delivered after, and records a failure (retrying, or its
retries exhausted) otherwise. The sweep (``billing.services.alert_sweep``) queues again what is due.

The guarantee is at least once, not exactly once: a process that dies between sending and recording (or
whose claim outlives ``claim_lease()``) has the delivery sent again by the sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from .id_batches import IDS_A_STATEMENT, id_batches

logger = logging.getLogger("llmhub.alerts")

# A claim older than its lease is a sender that died: the sweep may queue its delivery again. Longer than a
# send can take: a webhook call ends within LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS (15 s), an email within
# LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS (60 s); raised past half of it, they lengthen it (``claim_lease``).
CLAIM_LEASE = timedelta(minutes=5)
# A delivery that failed, or that the sweep queued, is left to its task this long before the sweep queues it
# again: longer than the longest wait between a task's retries (10 minutes), so a retry still pending is not
# doubled.
REQUEUE_AFTER = timedelta(minutes=15)
# The sweep queues one delivery at most this many times (each time with the task's own retries).
SWEEP_ROUNDS = 3


class DeliveryState:
    CLAIMED = "claimed"  # a task is sending it
    RETRYING = "retrying"  # it failed; the task's retry is pending
    EXHAUSTED = "exhausted"  # it failed, the task's retries are spent
    QUEUED = "queued"  # the sweep queued it
    NOBODY = "nobody"  # there was nobody to send it to (no address): nothing more to do


def delivery_field() -> models.JSONField:
    """The ``delivery`` dict of a row whose deliveries go out through here, under the name the functions
    below write."""
    return models.JSONField(
        default=dict,
        blank=True,
        help_text="Deliveries not made yet: being sent, failed (the error), queued again (core/outbox.py).",
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery an alert calls for: the row, its mark, where it records deliveries made, the task that
    sends it and the task's arguments, and what it is in words (for the log)."""

    row: models.Model
    mark: str
    delivered_field: str
    task: Any
    args: tuple[Any, ...]
    what: str


def deliveries_unsent(*marks: str) -> dict[str, dict[str, str]]:
    """``delivery`` entries for the deliveries an alert has no channel for when it is raised (no webhook set):
    ``nobody``, as one with no one to send it to. Left with no entry, a webhook set up later had the sweep post
    it every alert of its last day (``delivery_due``: a delivery never taken), a storm of stale alerts."""
    at = timezone.now().isoformat()
    return {mark: {"state": DeliveryState.NOBODY, "at": at} for mark in marks}


def task_queue(task: Any, *args: Any, what: str) -> bool:
    """``task.delay(*args)``; False, logged, when the broker cannot take it. Never raises: the row that needs
    the delivery is committed, and the sweep queues it again once the broker answers."""
    try:
        task.delay(*args)
    except Exception as exc:  # kombu's OperationalError, or whatever else the publish met: the sweep covers it
        logger.warning(
            "%s could not be queued (%s: %s); the alert sweep will queue it again", what, type(exc).__name__, exc
        )
        return False
    return True


def claim_lease() -> timedelta:
    """How long a claim holds: ``CLAIM_LEASE``, or twice the longer of the alerts' delivery deadlines when that is
    more, so that a delivery still within its deadline is never taken for one whose sender died."""
    deadline = max(settings.LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS, settings.LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS)
    return max(CLAIM_LEASE, timedelta(seconds=2 * deadline))


def _at(state: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(state["at"])


def delivery_claim(model: type[models.Model], pk: int, mark: str, *, delivered_field: str) -> bool:
    """Take the right to send ``mark`` of row ``pk``: False when it was delivered already, another task holds
    it (a claim younger than ``claim_lease()``), or the row is gone."""
    now = timezone.now()
    with transaction.atomic():
        row = model.objects.select_for_update().filter(pk=pk).first()
        if row is None or mark in getattr(row, delivered_field):
            return False
        state = row.delivery.get(mark) or {}
        if state.get("state") == DeliveryState.CLAIMED and _at(state) > now - claim_lease():
            return False
        row.delivery = {**row.delivery, mark: {**state, "state": DeliveryState.CLAIMED, "at": now.isoformat()}}
        row.save(update_fields=["delivery"])
    return True


def delivery_done(model: type[models.Model], pk: int, mark: str, *, delivered_field: str, **fields: Any) -> None:
    """Record ``mark`` delivered (and ``fields`` set), its claim released."""
    with transaction.atomic():
        row = model.objects.select_for_update().filter(pk=pk).first()
        if row is None:
            return
        delivered = getattr(row, delivered_field)
        if mark not in delivered:
            setattr(row, delivered_field, [*delivered, mark])
        row.delivery = {key: value for key, value in row.delivery.items() if key != mark}
        for name, value in fields.items():
            setattr(row, name, value)
        row.save(update_fields=[delivered_field, "delivery", *fields])


def delivery_release(model: type[models.Model], pk: int, mark: str, *, state: str, error: str = "") -> None:
    """Release the claim on ``mark``, recording why it was not delivered (``DeliveryState``)."""
    with transaction.atomic():
        row = model.objects.select_for_update().filter(pk=pk).first()
        if row is None:
            return
        kept = {key: value for key, value in (row.delivery.get(mark) or {}).items() if key == "rounds"}
        entry = {**kept, "state": state, "at": timezone.now().isoformat()}
        if error:
            entry["error"] = error[:300]
        row.delivery = {**row.delivery, mark: entry}
        row.save(update_fields=["delivery"])


def delivery_due(row: models.Model, mark: str, *, delivered_field: str, now: datetime) -> bool:
    """Whether the sweep should queue ``mark`` of ``row`` again: not
    delivered, and either never taken by a task (the broker could not take it, or the task was lost), or a
    claim past its lease, or a failure or a queueing left alone for ``REQUEUE_AFTER``, fewer than
    ``SWEEP_ROUNDS`` times. The caller keeps to the sweep's window (grace period, cut-off)."""
    if mark in getattr(row, delivered_field):
        return False
    state = row.delivery.get(mark)
    if not state:
        return True
    if state["state"] == DeliveryState.NOBODY or state.get("rounds", 0) >= SWEEP_ROUNDS:
        return False
    if state["state"] == DeliveryState.CLAIMED:
        return _at(state) <= now - claim_lease()
    return _at(state) <= now - REQUEUE_AFTER


def _requeue_state(
    row: models.Model, mark: str, *, delivered_field: str, now: datetime, again: bool
) -> dict[str, Any] | None:
    """What becomes of ``mark`` of ``row`` (read under its lock): the state it had (``{}`` for none), its
    ``delivery`` set to queued, when it is to go: for the sweep, when ``delivery_due`` (its rounds counted); for
    an admin's send again (``again``), when it is not made and no task is sending it (its rounds from 0). None when
    it is not to go."""
    before = row.delivery.get(mark) or {}
    if again:
        sending = before.get("state") == DeliveryState.CLAIMED and _at(before) > now - claim_lease()
        if mark in getattr(row, delivered_field) or sending:
            return None
        rounds = 0
    elif delivery_due(row, mark, delivered_field=delivered_field, now=now):
        rounds = before.get("rounds", 0) + 1
    else:
        return None
    row.delivery = {**row.delivery, mark: {"state": DeliveryState.QUEUED, "at": now.isoformat(), "rounds": rounds}}
    return before


def deliveries_requeue(
    deliveries: list[Delivery], *, now: datetime, again: bool = False
) -> list[tuple[Delivery, dict[str, Any]]]:
    """Record each of ``deliveries`` that is to go (``_requeue_state``) queued, under its row's lock (of two runs
    at once, one queues it), in one transaction: the rows of each model locked in one query a batch of
    ``IDS_A_STATEMENT`` and written in one more. Returns those to go, each with the state it replaced, for
    ``deliveries_unqueue``."""
    by_model: dict[type[models.Model], set[Any]] = {}
    for delivery in deliveries:
        by_model.setdefault(type(delivery.row), set()).add(delivery.row.pk)
    going: list[tuple[Delivery, dict[str, Any]]] = []
    with transaction.atomic():
        rows: dict[tuple[type[models.Model], Any], models.Model] = {}
        for model, pks in by_model.items():
            for batch in id_batches(sorted(pks)):
                for row in model.objects.select_for_update().filter(pk__in=batch).order_by("pk"):
                    rows[model, row.pk] = row
        changed: dict[tuple[type[models.Model], Any], models.Model] = {}
        for delivery in deliveries:
            key = (type(delivery.row), delivery.row.pk)
            row = rows.get(key)
            if row is None:  # deleted since
                continue
            before = _requeue_state(row, delivery.mark, delivered_field=delivery.delivered_field, now=now, again=again)
            if before is not None:
                changed[key] = row
                going.append((delivery, before))
        _deliveries_save(changed.values())
    return going


def _deliveries_save(rows: Iterable[models.Model]) -> None:
    """Write the ``delivery`` of ``rows``: one statement a batch of each model's."""
    by_model: dict[type[models.Model], list[models.Model]] = {}
    for row in rows:
        by_model.setdefault(type(row), []).append(row)
    for model, changed in by_model.items():
        model.objects.bulk_update(changed, ["delivery"], batch_size=IDS_A_STATEMENT)


def deliveries_queue(deliveries: Iterable[Delivery], *, now: datetime, again: bool = False) -> tuple[int, bool]:
    """Queue each of ``deliveries`` that is to go (``deliveries_requeue``: the sweep's, or with ``again`` an
    admin's send again), a batch of ``IDS_A_STATEMENT`` at a time: recorded queued in a few queries, then a task
    each. Returns how many were queued, and whether the broker refused one: that one, and those of its batch not
    queued yet, are put back as they were, and the rest are left for the next run (the broker is down)."""
    queued = 0
    for batch in id_batches(deliveries):
        going = deliveries_requeue(batch, now=now, again=again)
        for index, (delivery, _) in enumerate(going):
            if not task_queue(delivery.task, *delivery.args, what=delivery.what):
                deliveries_unqueue(going[index:], now=now)
                return queued, True
            queued += 1
    return queued, False


def deliveries_unqueue(going: list[tuple[Delivery, dict[str, Any]]], *, now: datetime) -> None:
    """The broker refused what ``deliveries_requeue`` recorded as queued: put back the states they replaced, so
    the next sweep tries again (and the refusal does not count as a round); under the rows' locks, a few queries
    a batch. One a task took since (an eager run, or a worker quicker than this) is left to it."""
    for batch in id_batches(going):
        with transaction.atomic():
            by_model: dict[type[models.Model], set[Any]] = {}
            for delivery, _ in batch:
                by_model.setdefault(type(delivery.row), set()).add(delivery.row.pk)
            rows: dict[tuple[type[models.Model], Any], models.Model] = {}
            for model, pks in by_model.items():
                for row in model.objects.select_for_update().filter(pk__in=sorted(pks)).order_by("pk"):
                    rows[model, row.pk] = row
            changed: dict[tuple[type[models.Model], Any], models.Model] = {}
            for delivery, before in batch:
                key = (type(delivery.row), delivery.row.pk)
                row = rows.get(key)
                if row is None:
                    continue
                state = row.delivery.get(delivery.mark) or {}
                if state.get("state") != DeliveryState.QUEUED or state.get("at") != now.isoformat():
                    continue
                kept = {name: value for name, value in row.delivery.items() if name != delivery.mark}
                if before:
                    kept[delivery.mark] = before
                row.delivery = kept
                changed[key] = row
            _deliveries_save(changed.values())


def delivery_failed(task: Any, model: type[models.Model], pk: int, mark: str, exc: BaseException) -> None:
    """A delivery task's attempt failed with ``exc``: its claim released, the error recorded for the admin, and
    whether ``task`` (bound) retries it or has spent its retries (the sweep takes it up again, within bounds)."""
    exhausted = task.request.retries >= task.max_retries
    state = DeliveryState.EXHAUSTED if exhausted else DeliveryState.RETRYING
    delivery_release(model, pk, mark, state=state, error=f"{type(exc).__name__}: {exc}")


def deliveries_send_again(deliveries: Iterable[Delivery]) -> tuple[int, bool]:
    """An admin's "send again": every delivery of ``deliveries`` not made yet queued now, whatever its age, its
    rounds or why it stopped (retries spent, nobody to send it to then), with its rounds counted from 0 again.
    One a task is sending (a live claim) is left to it. Returns what ``deliveries_queue`` does."""
    return deliveries_queue(deliveries, now=timezone.now(), again=True)


def send_again_report(queued: int, refused: bool) -> tuple[str, int]:
    """What an admin's "send again" says, and at which ``django.contrib.messages`` level."""
    from django.contrib import messages

    if refused:
        return (
            f"Queued {queued} delivery(ies); then the task queue refused one (is the broker down?): the rest are "
            "left as they were, and the alert sweep sends those raised in its window once it is back.",
            messages.WARNING,
        )
    if not queued:
        return "Nothing to send again: every delivery of these alerts was made, or is being made.", messages.INFO
    return f"Queued {queued} undelivered delivery(ies) again.", messages.SUCCESS
