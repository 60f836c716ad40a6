"""Reads of conversations, always scoped to who is asking (``ConversationReach``): another user's row, or a
conversation a gateway key may not reach, is as absent as a missing one."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connection
from django.db.models import Q, QuerySet
from django.utils import timezone

from billing.models import KeyScope, UsageRecord
from billing.selectors import api_key_subtree_ids
from core.exceptions import ApplicationError
from core.id_batches import id_batches
from core.text import text_storable

from .history import Turn
from .models import Conversation, Message, MessageStatus, Role, StoredResponse

if TYPE_CHECKING:
    from .callers import Caller

logger = logging.getLogger(__name__)


class NotFoundError(ApplicationError):
    """Also answers for rows of other users, so that ids cannot be probed."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ConversationBusyError(ApplicationError):
    """A reply is streaming in the conversation (from any socket, tab or server process): one at a time, so
    that two replies do not interleave their turns."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conversation_busy"

    def __init__(self, message: str = "A reply is already streaming in this conversation.") -> None:
        super().__init__(message, param="conversation")


# The process streaming a reply stamps its ``heartbeat_at`` every LLMHUB_CHAT_HEARTBEAT_INTERVAL seconds
# (``chat.services_turn``), from its first write to its last, also while it waits for the first token: a
# reply silent for this many intervals belongs to a process that died (killed, OOM, a lost host). Several, so
# that a beat delayed by a slow database (or one skipped while it was down) is not taken for a death.
HEARTBEATS_MISSED = 4
# Rows from before the heartbeat (null ``heartbeat_at``) keep the old rule: dead an hour after they began,
# or 5 minutes after when the ledger already holds their row (the run ended, only the message was not).
ABANDONED_AFTER = timedelta(hours=1)
ABANDONED_SETTLED_AFTER = timedelta(minutes=5)


def reply_silent_after() -> timedelta:
    """How long a streaming reply may go without a heartbeat before it counts as dead."""
    return timedelta(seconds=HEARTBEATS_MISSED * settings.LLMHUB_CHAT_HEARTBEAT_INTERVAL)


def messages_abandoned(*, now: datetime) -> QuerySet[Message]:
    """Replies left ``streaming`` by a server that stopped (crashed, was killed) while they streamed: the
    one rule for when a streaming reply is dead, for the sweep that closes them and for the busy check."""
    settled = UsageRecord.objects.values("request_id")
    old = Q(created_at__lt=now - ABANDONED_AFTER)
    old_and_settled = Q(created_at__lt=now - ABANDONED_SETTLED_AFTER, request_id__in=settled)
    unstamped = Q(heartbeat_at__isnull=True) & (old | old_and_settled)
    return Message.objects.filter(status=MessageStatus.STREAMING).filter(
        Q(heartbeat_at__lt=now - reply_silent_after()) | unstamped
    )


def conversation_busy_check(*, conversation_id: int, now: datetime | None = None, client: str = "") -> None:
    """Raise ``ConversationBusyError`` while a reply streams in the conversation; one a dead server left
    streaming (``messages_abandoned``) does not count, nor one streaming for ``client`` (a send of that client's
    takes it over: ``chat.services.chat_turn_begin``)."""
    now = now or timezone.now()
    streaming = Message.objects.filter(
        conversation_id=conversation_id, role=Role.ASSISTANT, status=MessageStatus.STREAMING
    ).exclude(pk__in=messages_abandoned(now=now).filter(conversation_id=conversation_id).values("pk"))
    if client:
        streaming = streaming.exclude(stream_client=client)
    if streaming.exists():
        raise ConversationBusyError()


@dataclass(frozen=True, slots=True)
class ConversationReach:
    """Which of a user's conversations a caller reaches, on REST and the WebSocket alike.

    A person (web session, JWT) reaches all of theirs, and so does a gateway key holding the
    ``conversations:manage`` scope; any other gateway key only the ones started by itself or by a key in its
    subtree (the keys created under it, at any depth: the subtree ``keys:manage`` manages): a key handed to an
    app (perhaps limited to one model) must not read, rename or delete every private conversation of its
    owner. ``key_id`` is the gateway key calling, recorded on the conversations it starts."""

    user_id: int
    key_id: int | None = None
    whole_history: bool = True

    def conversations(self, prefix: str = "") -> Q:
        """The filter of the conversations reached (``prefix``: the path to them, ``"conversation__"``). A key's
        subtree is read here, where the caller reads the database, not when the reach is made (on the socket's
        event loop)."""
        reached = Q(**{f"{prefix}owner_id": self.user_id})
        if not self.whole_history:
            key_ids = api_key_subtree_ids(self.key_id) if self.key_id is not None else []
            reached &= Q(**{f"{prefix}api_key_id__in": key_ids})
        return reached


def conversation_reach(caller: Caller) -> ConversationReach:
    """What ``caller`` reaches: a person (no ``api_key_id``) or the gateway key with its scopes."""
    key_id = caller.api_key_id
    whole_history = key_id is None or KeyScope.CONVERSATIONS in caller.key_scopes
    return ConversationReach(user_id=caller.user_id, key_id=key_id, whole_history=whole_history)


def conversation_list(
    *, reach: ConversationReach, before: tuple[datetime, int] | None = None
) -> QuerySet[Conversation]:
    """Not archived, most recently active first. ``before``: a listed conversation's ``(updated_at, id)``, for
    those after it in that order (keyset paging: no row skipped or repeated as replies move others up)."""
    conversations = Conversation.objects.filter(reach.conversations(), archived=False)
    if before is not None:
        updated_at, conversation_id = before
        conversations = conversations.filter(
            Q(updated_at__lt=updated_at) | Q(updated_at=updated_at, id__lt=conversation_id)
        )
    return conversations.order_by("-updated_at", "-id")


def conversation_get(*, reach: ConversationReach, conversation_id: int) -> Conversation:
    conversation = Conversation.objects.filter(reach.conversations(), pk=conversation_id).first()
    if conversation is None:
        raise NotFoundError(f"No conversation {conversation_id}.", param="conversation")
    return conversation


def conversation_messages(*, conversation: Conversation) -> QuerySet[Message]:
    """The messages with each reply's ledger row, joined in the same query (``None`` until it is written)."""
    return conversation.messages.select_related("usage_record").order_by("created_at", "id")


def conversation_turns(*, conversation: Conversation) -> list[Turn]:
    """The history the model is shown: user turns, and replies that produced text.

    A reply that failed with nothing written adds nothing; a stopped reply keeps what was written, since the
    user saw it and may refer to it.
    """
    rows = (
        conversation.messages.filter(role__in=[Role.USER, Role.ASSISTANT])
        .exclude(role=Role.ASSISTANT, content="")
        .exclude(role=Role.ASSISTANT, status=MessageStatus.STREAMING)
        .order_by("created_at", "id")
        .values_list("role", "content")
    )
    return [Turn(role, content) for role, content in rows]


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a new turn in a conversation is sent with, before trimming: its system prompt and history."""

    system_prompt: str = ""
    turns: tuple[Turn, ...] = ()


def turn_context(*, reach: ConversationReach, conversation_id: int | None, client: str = "") -> TurnContext:
    """The context of a new turn: empty for a new conversation (``conversation_id=None``). A conversation
    with a reply streaming is busy (``ConversationBusyError``; not one streaming for the same ``client``, which
    the turn takes over): checked here, before the turn is admitted, and again where its messages are written
    (``chat.services.chat_turn_begin``)."""
    if conversation_id is None:
        return TurnContext()
    conversation = conversation_get(reach=reach, conversation_id=conversation_id)
    conversation_busy_check(conversation_id=conversation.pk, client=client)
    return TurnContext(conversation.system_prompt, tuple(conversation_turns(conversation=conversation)))


def message_get(*, reach: ConversationReach, message_id: int) -> Message:
    message = (
        Message.objects.select_related("conversation", "usage_record")
        .filter(reach.conversations("conversation__"), pk=message_id)
        .first()
    )
    if message is None:
        raise NotFoundError(f"No message {message_id}.", param="message")
    return message


def stored_responses_reached(*, reach: ConversationReach, now: datetime | None = None) -> QuerySet[StoredResponse]:
    """The stored responses of ``/v1/responses`` a caller reaches (as it reaches conversations: its own user's, and
    for a gateway key without ``conversations:manage`` only those it or its subtree made), not yet expired nor
    deleted: one past its retention is gone even before the task deletes it, and one its owner deleted while later
    responses continue it is gone though its items are kept for their chains."""
    return StoredResponse.objects.filter(
        reach.conversations(), expires_at__gt=now or timezone.now(), deleted_at__isnull=True
    )


def stored_responses_dead(now: datetime) -> Q:
    """Stored responses gone for their owner: expired, or deleted while others continued them (kept, hidden, for
    those responses' chains)."""
    return Q(expires_at__lte=now) | Q(deleted_at__isnull=False)


def stored_responses_removal(pks: list[int], *, now: datetime | None = None) -> list[int]:
    """What deleting the stored responses ``pks`` as data (an admin's delete) takes, by primary key: them, every
    response that continues them (at any depth: their chains could not be read without them), and the hidden ones
    before them (expired, or deleted by their owner) kept for them alone, which nothing else refers to any more."""
    if not pks:
        return []
    now = now or timezone.now()
    descendants = _stored_descendants(pks, now=now)
    taken = set(descendants)
    # Those they continue outside what is taken, where the walk to the hidden ones before them starts.
    previous = {before for before, _ in descendants.values() if before is not None}
    taken |= stored_responses_freed(previous - taken, taken=taken, now=now)
    return sorted(taken)


def stored_responses_freed(starts: set[int], *, taken: set[int], now: datetime) -> set[int]:
    """The hidden stored responses (expired, or deleted by their owner) kept for ``taken`` alone, by primary key:
    from each of ``starts`` up its chain, one goes while it is hidden and nothing live continues it any more (every
    response continuing it is taken, or goes: a branch all hidden goes with it); the first that stays ends the walk.
    A few queries a batch of ``IDS_A_STATEMENT`` starts, however long their chains (one recursive query for the
    chains' hidden rows, each with those continuing it; one for the branches beside them), the walks then in
    memory, the newest start first."""
    freed: set[int] = set()
    chains = _stored_chains_state(starts, now=now)
    # The branches continuing a hidden row of a chain, each with all that continues it (a walk passes one only if
    # all of it is hidden too).
    beside: set[int] = set()
    for _, dead, continued in chains.values():
        if dead:
            beside |= continued
    branches = _stored_descendants(beside - taken, now=now)
    below: dict[int, set[int]] = {}
    for pk, (previous, _) in branches.items():
        if previous is not None:
            below.setdefault(previous, set()).add(pk)
    for start in sorted(starts, reverse=True):
        gone = taken | freed
        pk: int | None = start
        seen: set[int] = set()
        while pk is not None and pk in chains and pk not in seen and len(seen) < STORED_CHAIN_MAX_LENGTH:
            seen.add(pk)
            previous, dead, continued = chains[pk]
            if pk not in gone:
                if not dead:
                    break
                if continued - gone:  # others continue it: it goes only if all they lead to is hidden too, with them
                    others = _stored_subtree(continued - gone, below) & branches.keys()
                    if not all(branches[other][1] for other in others):
                        break
                    gone |= others
                    freed |= others
                gone.add(pk)
                freed.add(pk)
            pk = previous
    return freed


def _stored_chains_state(starts: set[int], *, now: datetime) -> dict[int, tuple[int | None, bool, set[int]]]:
    """The stored responses ``starts`` and those before them up to the first that is not hidden (included), each
    with the one it continues, whether it is gone for its owner (``stored_responses_dead``) and every response that
    continues it: one recursive query a batch of ``IDS_A_STATEMENT`` starts (``UNION`` reads a row once, however
    many chains share it, and stops at a row seen: a loop, rows edited by hand)."""
    table = connection.ops.quote_name(StoredResponse._meta.db_table)
    at = connection.ops.adapt_datetimefield_value(now)
    chains: dict[int, tuple[int | None, bool, set[int]]] = {}
    for batch in id_batches(sorted(starts)):
        with connection.cursor() as cursor:
            cursor.execute(
                _STORED_CHAINS_STATE.format(table=table, ids=", ".join(["%s"] * len(batch))), [at, *batch, at]
            )
            for pk, previous, dead, continuing in cursor.fetchall():
                _, _, continued = chains.setdefault(pk, (previous, bool(dead), set()))
                if continuing is not None:
                    continued.add(continuing)
    return chains


# Chains from the rows named, up to their first row not gone for its owner (``stored_responses_dead``), each row
# with what it continues, whether it is gone, and (one a row) every response that continues it (none: null).
_STORED_CHAINS_STATE = """
WITH RECURSIVE chain(id, previous_id, dead) AS (
    SELECT id, previous_id, CASE WHEN expires_at <= %s OR deleted_at IS NOT NULL THEN 1 ELSE 0 END
    FROM {table} WHERE id IN ({ids})
    UNION
    SELECT r.id, r.previous_id, CASE WHEN r.expires_at <= %s OR r.deleted_at IS NOT NULL THEN 1 ELSE 0 END
    FROM {table} r JOIN chain c ON r.id = c.previous_id WHERE c.dead = 1
)
SELECT c.id, c.previous_id, c.dead, n.id FROM chain c LEFT JOIN {table} n ON n.previous_id = c.id ORDER BY c.id, n.id
"""  # the table's name is ours (format), the values parameters


def _stored_subtree(roots: set[int], below: dict[int, set[int]]) -> set[int]:
    """``roots`` and every response continuing them, at any depth, from ``below`` (each one's continuations)."""
    found: set[int] = set()
    pending = list(roots)
    while pending:
        pk = pending.pop()
        if pk not in found:
            found.add(pk)
            pending.extend(below.get(pk, ()))
    return found


def _stored_descendants(pks: set[int] | list[int], *, now: datetime) -> dict[int, tuple[int | None, bool]]:
    """The stored responses ``pks`` and every one continuing them, at any depth, each with the one it continues and
    whether it is gone for its owner (``stored_responses_dead``): one recursive query (``UNION`` stops at a row seen:
    a loop edited by hand) for each ``IDS_A_STATEMENT`` of ``pks`` (an admin's selection across the list is more
    than a statement can name)."""
    table = connection.ops.quote_name(StoredResponse._meta.db_table)
    at = connection.ops.adapt_datetimefield_value(now)
    found: dict[int, tuple[int | None, bool]] = {}
    for batch in id_batches(sorted(pks)):
        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                WITH RECURSIVE taken(id) AS (
                    SELECT id FROM {table} WHERE id IN ({", ".join(["%s"] * len(batch))})
                    UNION
                    SELECT r.id FROM {table} r JOIN taken t ON r.previous_id = t.id
                )
                SELECT r.id, r.previous_id,
                    CASE WHEN r.expires_at <= %s OR r.deleted_at IS NOT NULL THEN 1 ELSE 0 END
                FROM taken t JOIN {table} r ON r.id = t.id
                """,  # noqa: S608 (the table's name is ours; the values are parameters)
                [*batch, at],
            )
            found.update((pk, (previous, bool(dead))) for pk, previous, dead in cursor.fetchall())
    return found


def stored_response_id_storable(response_id: str) -> bool:
    """Whether a row could have ``response_id``: one with a NUL (PostgreSQL refuses it in a query) or a lone
    surrogate (UTF-8 cannot encode it) is no response's, and asking the database for it is a 500."""
    return text_storable(response_id) == response_id


def stored_response_get(*, reach: ConversationReach, response_id: str, now: datetime | None = None) -> StoredResponse:
    """The stored response ``response_id``; ``NotFoundError`` for one unknown, expired or out of reach alike, and
    for an id no row can hold (``stored_response_id_storable``)."""
    stored = None
    if stored_response_id_storable(response_id):
        stored = stored_responses_reached(reach=reach, now=now).filter(response_id=response_id).first()
    if stored is None:
        raise NotFoundError(f"No response found with id '{response_id}'.", param="response_id")
    return stored


# The most responses a chain by reference holds (``StoredResponse.previous``), the last included: one continuing a
# chain this long is kept whole (``chat.services_responses.stored_response_save``), so that a chain is read in a
# bounded walk, and a loop (a row edited by hand) is found, not followed for ever.
STORED_CHAIN_MAX_LENGTH = 1000


@dataclass(frozen=True, slots=True)
class StoredInput:
    """The whole input a stored response answered, and how many responses its chain by reference holds (itself
    included: 1 for one kept whole)."""

    items: list[dict[str, Any]]
    length: int


def stored_response_input(stored: StoredResponse) -> StoredInput:
    """The whole input ``stored`` answered: its previous responses' input and output items, oldest first, then its
    own (what ``GET …/input_items`` lists, and what ``previous_response_id`` continues). Its ancestors are read
    whatever their expiry or deletion (they are kept for it): one recursive query for the chain, one for the items.
    A chain that cannot be followed to its start (a loop, or longer than ``STORED_CHAIN_MAX_LENGTH``: rows edited
    by hand) is logged and ``NotFoundError``, as an unknown response."""
    if stored.previous_id is None:
        return StoredInput(stored.input_items, 1)
    ancestors = _stored_ancestors(stored.previous_id)
    if not ancestors:
        logger.error("stored response %s: its chain could not be followed to its start", stored.response_id)
        raise NotFoundError(f"No response found with id '{stored.response_id}'.", param="response_id")
    rows = StoredResponse.objects.filter(pk__in=ancestors).values_list("pk", "input_items", "output_items")
    held = {pk: (input, output) for pk, input, output in rows}
    if len(held) != len(ancestors):  # deleted meanwhile (by an admin, with those continuing it): gone
        raise NotFoundError(f"No response found with id '{stored.response_id}'.", param="response_id")
    items: list[dict[str, Any]] = []
    for pk in reversed(ancestors):
        items += [*held[pk][0], *held[pk][1]]
    return StoredInput([*items, *stored.input_items], len(ancestors) + 1)


def _stored_ancestors(pk: int) -> list[int]:
    """The primary keys of the response ``pk`` and of those before it, newest first, up to one kept whole; empty
    when there is none within ``STORED_CHAIN_MAX_LENGTH - 1`` rows, or a row comes twice (a loop)."""
    table = connection.ops.quote_name(StoredResponse._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH RECURSIVE ancestors(id, previous_id, depth) AS (
                SELECT id, previous_id, 1 FROM {table} WHERE id = %s
                UNION ALL
                SELECT r.id, r.previous_id, a.depth + 1 FROM {table} r JOIN ancestors a ON r.id = a.previous_id
                WHERE a.depth < %s
            )
            SELECT id, previous_id FROM ancestors ORDER BY depth
            """,  # noqa: S608 (the table's name is ours; the values are parameters)
            [pk, STORED_CHAIN_MAX_LENGTH - 1],
        )
        rows = cursor.fetchall()
    ids = [row[0] for row in rows]
    if not rows or rows[-1][1] is not None or len(set(ids)) != len(ids):
        return []
    return ids
