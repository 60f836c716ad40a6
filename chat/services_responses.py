"""Writes of stored responses (``StoredResponse``): keeping one that ``POST /v1/responses`` made with ``store``,
deleting one for its owner, and deleting those past ``LLMHUB_RESPONSES_RETENTION_DAYS``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from core.text import json_storable, text_storable

from .models import StoredResponse
from .responses_chain import input_items
from .selectors import ConversationReach, stored_response_id_storable, stored_responses_reached

EXPIRE_BATCH_SIZE = 1000
# What the ``Response`` says apart from what has its own column.
_OWN_COLUMNS = frozenset({"id", "model", "status", "instructions", "output", "usage", "created_at"})


def stored_response_save(
    *, user_id: int, api_key_id: int | None, response: dict[str, Any], input: Any, now: datetime | None = None
) -> StoredResponse:
    """Keep ``response``, as answered, and the ``input`` it answered (the whole chained input), as items; its text
    as chat messages are kept (``text_storable``: no NUL, which PostgreSQL cannot hold, nor lone surrogate)."""
    now = now or timezone.now()
    instructions = response.get("instructions")
    return StoredResponse.objects.create(
        response_id=response["id"],
        owner_id=user_id,
        api_key_id=api_key_id,
        model_name=response["model"],
        status=response["status"],
        input_items=json_storable(input_items(input)),
        output_items=json_storable(response["output"]),
        instructions=None if instructions is None else text_storable(instructions),
        usage=response.get("usage"),
        response=json_storable({name: value for name, value in response.items() if name not in _OWN_COLUMNS}),
        created_at=datetime.fromtimestamp(response["created_at"], tz=UTC) if response.get("created_at") else now,
        expires_at=now + timedelta(days=settings.LLMHUB_RESPONSES_RETENTION_DAYS),
    )


def stored_response_delete(*, reach: ConversationReach, response_id: str, now: datetime | None = None) -> bool:
    """Delete the stored response ``response_id`` if ``reach`` reaches it; whether one was deleted."""
    if not stored_response_id_storable(response_id):
        return False
    deleted, _ = stored_responses_reached(reach=reach, now=now).filter(response_id=response_id).delete()
    return bool(deleted)


def stored_responses_expire(*, now: datetime | None = None, batch_size: int = EXPIRE_BATCH_SIZE) -> int:
    """Delete the stored responses past their retention, in batches (each its own short statement, so that a
    backlog never holds the table long); returns how many went."""
    now = now or timezone.now()
    deleted = 0
    while True:
        batch = list(StoredResponse.objects.filter(expires_at__lte=now).values_list("pk", flat=True)[:batch_size])
        if not batch:
            return deleted
        StoredResponse.objects.filter(pk__in=batch).delete()
        deleted += len(batch)
