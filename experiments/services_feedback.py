"""Feedback on requests, from ``POST /v1/feedback`` and the chat page's thumbs alike: one ``Feedback`` row per
request and metric, which results join to the ledger by ``request_id``.

Only the caller who made a request may rate it (``request_is_users``): a person any of their requests, a gateway
key only those made by itself or by a key created under it (its subtree, ``api_key_subtree_ids``), so that a key
handed to an app rates neither another app's requests nor its owner's web-chat replies. Its ledger row is the
proof, and the
ledger is written in the background (``billing.services.ledger``): a client that rates its reply the moment
it ends may come before the row. So the row is looked for among this process's unwritten rows first (queued
for the writer, or spooled while the database is slow or down), then in the ledger, and, when it is in
neither, the ledger is watched for ``LEDGER_WAIT_SECONDS`` (another server process may hold the row until its
batch commits) before the request is taken for unknown."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Collection

from asgiref.sync import sync_to_async
from django.db import transaction

from billing.models import UsageRecord
from billing.selectors import api_key_subtree_ids
from billing.services.ledger import usage_unwritten_maker

from .models import Feedback, FeedbackMetric, FeedbackSource

# How long a request missing from the ledger may still be on its way there: a batch commits within
# milliseconds unless the database struggles (the 404 then says to send the rating again later).
LEDGER_WAIT_SECONDS = 2.0
# The ledger is asked again after 50 ms, then twice as long each time up to 400 ms: a row on its way
# usually lands at once, and a stream of unknown ids costs a few queries each rather than one per tick.
LEDGER_POLL_SECONDS = (0.05, 0.1, 0.2, 0.4)
# Ids as llmhub makes them (``chat.pipeline.new_request_id``; the chat socket's when its client names none):
# only such an id is waited for, so that a made-up one is answered at once.
_REQUEST_ID = re.compile(r"(req|ws)_[0-9a-f]{32}")


def _ledger_owned(*, request_id: str, user_id: int, key_ids: Collection[int] | None) -> bool | None:
    """Whether the ledger row of ``request_id`` is the user's (made by them, or with one of their keys) and, with
    ``key_ids``, was made by one of those keys; None when there is no such row."""
    row = (
        UsageRecord.objects.filter(request_id=request_id)
        .values_list("user_id", "api_key__user_id", "api_key_id")
        .first()
    )
    if row is None:
        return None
    made_by, key_owner, key_id = row
    return user_id in (made_by, key_owner) and (key_ids is None or key_id in key_ids)


def _unwritten_owned(*, request_id: str, user_id: int, key_ids: Collection[int] | None) -> bool | None:
    maker = usage_unwritten_maker(request_id)
    if maker is None:
        # Not this process's, or a row kept under its key's hash (the database was down when it was made),
        # attributed when it is written: until then it proves nothing.
        return None
    made_by, key_id = maker
    return made_by == user_id and (key_ids is None or key_id in key_ids)


async def request_is_users(*, request_id: str, user_id: int, api_key_id: int | None = None) -> bool:
    """Whether ``request_id`` is a request of the user ``user_id`` and, asked by their gateway key
    ``api_key_id``, one made by that key or a key in its subtree: False for any other request and for one that
    does not exist, alike, and after the same time (a caller learns nothing of requests out of its reach, not
    even from how long the answer took)."""
    deadline = time.monotonic() + (LEDGER_WAIT_SECONDS if _REQUEST_ID.fullmatch(request_id) else 0.0)
    key_ids = None if api_key_id is None else await sync_to_async(api_key_subtree_ids)(api_key_id)
    polls = 0
    while True:
        owned = _unwritten_owned(request_id=request_id, user_id=user_id, key_ids=key_ids)
        if owned is None:
            owned = await sync_to_async(_ledger_owned)(request_id=request_id, user_id=user_id, key_ids=key_ids)
        if owned:
            return True
        if owned is False:
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            return False
        if time.monotonic() >= deadline:
            return False
        pause = LEDGER_POLL_SECONDS[min(polls, len(LEDGER_POLL_SECONDS) - 1)]
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        polls += 1


def feedback_set(
    *,
    request_id: str,
    user_id: int | None,
    metric: str,
    value: float,
    comment: str = "",
    source: str = FeedbackSource.API,
) -> tuple[Feedback, bool]:
    """Record (or replace) the ``metric`` feedback on ``request_id``; True with it when it is new.

    Safe when two clients rate the same request at once: the unique constraint on (request, metric) lets one
    insert win, and ``update_or_create`` turns the other's refused insert into an update of that row."""
    with transaction.atomic():
        return Feedback.objects.update_or_create(
            request_id=request_id,
            metric=metric,
            defaults={"user_id": user_id, "value": value, "comment": comment, "source": source},
        )


def feedback_clear(*, request_id: str, metric: str = FeedbackMetric.THUMBS) -> None:
    """Remove the ``metric`` feedback on ``request_id`` (the chat page's thumbs taken back)."""
    Feedback.objects.filter(request_id=request_id, metric=metric).delete()
