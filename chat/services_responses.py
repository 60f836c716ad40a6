"""Writes of stored responses (``StoredResponse``): keeping one that ``POST /v1/responses`` made with ``store``,
deleting one for its owner, and deleting those past ``LLMHUB_RESPONSES_RETENTION_DAYS``. A chained response refers
to the one it continues (``previous``), so one gone for its owner is kept while a live one still continues it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from core.id_batches import id_batches
from core.text import json_storable, text_storable

from .models import StoredResponse
from .responses_chain import Chain, input_items
from .selectors import (
    STORED_CHAIN_MAX_LENGTH,
    ConversationReach,
    stored_response_id_storable,
    stored_responses_freed,
    stored_responses_reached,
    stored_responses_removal,
)

logger = logging.getLogger(__name__)

EXPIRE_BATCH_SIZE = 1000
# How many times in a row ``stored_responses_expire`` tries a batch the database refused (each time a response kept
# meanwhile continues one of it, which the next try sees) before it leaves the rest to its next run.
EXPIRE_REFUSALS = 3
# What the ``Response`` says apart from what has its own column.
_OWN_COLUMNS = frozenset({"id", "model", "status", "instructions", "output", "usage", "created_at"})


def stored_response_save(
    *,
    user_id: int,
    api_key_id: int | None,
    response: dict[str, Any],
    input: Any,
    chained: Chain | None = None,
    now: datetime | None = None,
) -> StoredResponse:
    """Keep ``response``, as answered, and the ``input`` it answered, as items; its text as chat messages are kept
    (``text_storable``: no NUL, which PostgreSQL cannot hold, nor lone surrogate). ``input`` is the whole input;
    continuing a stored response (``chained``), only the items the client gave are kept, with a reference to that
    response (whose chain holds the rest): N turns of a chain take space in N, not N². A chain of
    ``STORED_CHAIN_MAX_LENGTH`` is not lengthened: the response is kept whole, and starts a new one."""
    now = now or timezone.now()
    instructions = response.get("instructions")
    previous = None
    if chained is not None and chained.history and chained.length < STORED_CHAIN_MAX_LENGTH:
        previous, input = chained.previous, chained.given
    return StoredResponse.objects.create(
        response_id=response["id"],
        owner_id=user_id,
        api_key_id=api_key_id,
        model_name=response["model"],
        status=response["status"],
        previous_id=previous,
        input_items=json_storable(input_items(input)),
        output_items=json_storable(response["output"]),
        instructions=None if instructions is None else text_storable(instructions),
        usage=response.get("usage"),
        response=json_storable({name: value for name, value in response.items() if name not in _OWN_COLUMNS}),
        created_at=datetime.fromtimestamp(response["created_at"], tz=UTC) if response.get("created_at") else now,
        expires_at=now + timedelta(days=settings.LLMHUB_RESPONSES_RETENTION_DAYS),
    )


def stored_response_delete(*, reach: ConversationReach, response_id: str, now: datetime | None = None) -> bool:
    """Delete the stored response ``response_id`` if ``reach`` reaches it; whether one was deleted. One that later
    responses continue is hidden (``deleted_at``): a 404 from now on, not to be continued, its items kept for their
    chains until none refers to it; one that none continues goes at once, and so do the hidden or expired ones
    before it that were kept for it alone."""
    if not stored_response_id_storable(response_id):
        return False
    now = now or timezone.now()
    stored = stored_responses_reached(reach=reach, now=now).filter(response_id=response_id).first()
    if stored is None or not StoredResponse.objects.filter(pk=stored.pk, deleted_at=None).update(deleted_at=now):
        return False
    _stored_chain_prune(stored.pk, now=now)
    return True


def stored_responses_remove(pks: list[int], *, now: datetime | None = None) -> int:
    """Delete the stored responses ``pks`` as data (an admin's delete), with what that takes
    (``stored_responses_removal``: those continuing them, and the hidden ones kept for them alone); how many went.
    What it takes is locked, then found again until it holds no new one: a response kept meanwhile continuing one of
    them is taken too (its chain could not be read without them), and one kept after the lock is refused by the
    database (its reference is checked against the locked row, deleted), answered ``store: false``."""
    with transaction.atomic():
        taken = stored_responses_removal(pks, now=now)
        while True:
            for batch in id_batches(taken):
                list(StoredResponse.objects.select_for_update().filter(pk__in=batch).values_list("pk", flat=True))
            found = stored_responses_removal(pks, now=now)
            if found == taken:
                break
            taken = found
        # A statement a batch (more than one can name), in any order: the database checks the references at the
        # commit, when every one of them is gone (Django's delete of a batch would refuse one that a later batch's
        # row continues).
        deleted = 0
        table = connection.ops.quote_name(StoredResponse._meta.db_table)
        for batch in id_batches(taken):
            with connection.cursor() as cursor:
                cursor.execute(
                    f"DELETE FROM {table} WHERE id IN ({', '.join(['%s'] * len(batch))})",  # noqa: S608 (ours)
                    batch,
                )
                deleted += cursor.rowcount
        return deleted


def _stored_chain_prune(pk: int, *, now: datetime) -> None:
    """Delete the response ``pk`` if it is gone for its owner and no other refers to it, and the hidden ones before it
    that were kept for it alone (``stored_responses_freed``: one query, however long the chain), in one transaction,
    whose end checks the references (deferred): if a response kept meanwhile continues one of them, the database
    refuses the deletion and they stay, for the hourly task."""
    freed = stored_responses_freed({pk}, taken=set(), now=now)
    if not freed:
        return
    try:
        with transaction.atomic():
            StoredResponse.objects.filter(pk__in=freed).delete()
    except IntegrityError:
        return


def stored_responses_expire(*, now: datetime | None = None, batch_size: int = EXPIRE_BATCH_SIZE) -> int:
    """Delete the stored responses past their retention or deleted by their owner that no live one continues (an
    expired or deleted one that a live one continues is kept for its chain, until that one goes), in batches (each
    one statement, so that a backlog never holds the table long); returns how many went. A batch is whole chains'
    ends (``_DEAD_DELETE``): a dead chain of any length goes in one pass, not one row per pass. A batch the database
    refuses (a response kept while the statement ran continues one of it: the reference is checked at its end) is
    tried again, which sees that response and keeps the one it continues; ``EXPIRE_REFUSALS`` in a row leave the
    rest to the next run."""
    now = now or timezone.now()
    deleted = refused = 0
    while True:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                at = connection.ops.adapt_datetimefield_value(now)
                table = connection.ops.quote_name(StoredResponse._meta.db_table)
                cursor.execute(_DEAD_DELETE.format(table=table), [at, at, at, batch_size])
                count = cursor.rowcount
        except IntegrityError:
            refused += 1
            if refused >= EXPIRE_REFUSALS:
                logger.warning(
                    "stored responses: a batch of the expiry was refused %d times; left to the next run", refused
                )
                return deleted
            continue
        refused = 0
        deleted += count
        if count < batch_size:
            return deleted


# The dead stored responses (past their retention, or deleted) that no live one continues, by whole chains' ends: the
# dead that a live one refers to and every one before them are ``needed``; the rest of the dead go, the newest first
# (a response refers to an older one, so a batch never deletes one that a response left behind refers to). One
# statement on SQLite and PostgreSQL alike (the ``WITH`` inside: SQLite's driver counts no rows of a statement
# that starts with one); ``UNION`` stops at a row seen (a loop, rows edited by hand).
_DEAD_DELETE = """
DELETE FROM {table} WHERE id IN (
    WITH RECURSIVE needed(id) AS (
        SELECT d.id FROM {table} d
        WHERE (d.expires_at <= %s OR d.deleted_at IS NOT NULL) AND EXISTS (
            SELECT 1 FROM {table} r WHERE r.previous_id = d.id AND r.expires_at > %s AND r.deleted_at IS NULL
        )
        UNION
        SELECT r.previous_id FROM {table} r JOIN needed n ON r.id = n.id WHERE r.previous_id IS NOT NULL
    )
    SELECT d.id FROM {table} d
    WHERE (d.expires_at <= %s OR d.deleted_at IS NOT NULL) AND NOT EXISTS (SELECT 1 FROM needed n WHERE n.id = d.id)
    ORDER BY d.id DESC
    LIMIT %s
)
"""  # the table's name is ours (format), the values parameters
