"""Writes of conversations and messages. Each takes the owner into account: callers pass the user's id."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from core.exceptions import ApplicationError
from core.text import text_storable
from experiments.models import FeedbackMetric, FeedbackSource
from experiments.services_feedback import feedback_clear, feedback_set

from .models import TITLE_MAX_LENGTH, Conversation, Message, MessageStatus, Role
from .selectors import ConversationReach, NotFoundError, conversation_busy_check, messages_abandoned


def conversation_title_from(content: str) -> str:
    """The first line of the first message, whitespace collapsed, cut at a word boundary near 60 chars."""
    text = " ".join(content.split())
    if len(text) <= TITLE_MAX_LENGTH:
        return text or "New conversation"
    cut = text[: TITLE_MAX_LENGTH - 1]
    if " " in cut[TITLE_MAX_LENGTH // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" .,;:") + "…"


@dataclass(frozen=True)
class TakenOver:
    """A reply a takeover closed, and the channel of the consumer streaming it (empty: none recorded)."""

    message_id: int
    stream_channel: str


@dataclass(frozen=True)
class TurnRows:
    conversation: Conversation
    user_message: Message
    assistant_message: Message
    created_conversation: bool
    # The replies this turn took over from its client's lost socket, whose turns are to be told (``ChatTurn``).
    taken_over: tuple[TakenOver, ...] = ()


@transaction.atomic
def chat_turn_begin(
    *,
    reach: ConversationReach,
    conversation_id: int | None,
    model_name: str,
    provider_name: str,
    content: str,
    request_id: str,
    client: str = "",
    stream_channel: str = "",
) -> TurnRows:
    """The user's message and an empty reply in ``streaming`` state, written together.

    ``conversation_id=None`` starts a conversation titled after ``content``, recorded as started by the
    gateway key calling, if one is (``reach.key_id``); else it must be one ``reach`` reaches. The reply points at the
    ledger row the pipeline will write under ``request_id``. An archived conversation sent into is in use
    again: it is unarchived, and back in the owner's list.

    One reply streams in a conversation at a time, whichever socket or process sends: under the
    conversation's row lock (SQLite: the transaction's write lock), a reply still streaming there refuses
    the turn with ``ConversationBusyError``, and one a dead server left streaming is closed first. So is one
    streaming for the same ``client`` (a chat page, a program naming itself), from a socket it has lost: its network
    vanished without a close, and the server would not know the socket dead before its keepalive gives up (up to
    20 s). The replies so closed are returned (``TurnRows.taken_over``) with the channel of the consumer streaming each,
    for the caller to tell it once this transaction has committed; its turn, in whichever process, stops as on a
    disconnect (``chat.services_turn.ChatTurn``), settled once for what the upstream wrote, or, when the message is
    lost, at its next checkpoint or heartbeat. The reply begins with its heartbeat, which the turn streaming it keeps
    stamping (``message_heartbeat``); ``stream_channel`` is the channel of the consumer that will stream it.
    """
    created = conversation_id is None
    now = timezone.now()
    taken_over: tuple[TakenOver, ...] = ()
    if created:
        conversation = Conversation.objects.create(
            owner_id=reach.user_id,
            api_key_id=reach.key_id,
            title=conversation_title_from(content),
            model_name=model_name,
        )
    else:
        conversation = (
            Conversation.objects.select_for_update().filter(reach.conversations(), pk=conversation_id).first()
        )
        if conversation is None:
            raise NotFoundError(f"No conversation {conversation_id}.", param="conversation")
        messages_close_abandoned(now=now, conversation_id=conversation.pk)
        if client:
            taken_over = messages_take_over(conversation_id=conversation.pk, client=client)
        conversation_busy_check(conversation_id=conversation.pk, now=now)
        conversation.model_name = model_name
        conversation.archived = False
        conversation.save(update_fields=["model_name", "archived", "updated_at"])
    user_message = Message.objects.create(conversation=conversation, role=Role.USER, content=content)
    assistant_message = Message.objects.create(
        conversation=conversation,
        role=Role.ASSISTANT,
        model_name=model_name,
        provider_name=provider_name,
        request_id=request_id,
        usage_record_id=request_id,
        status=MessageStatus.STREAMING,
        heartbeat_at=now,
        stream_client=client,
        stream_channel=stream_channel,
    )
    return TurnRows(conversation, user_message, assistant_message, created, taken_over)


# What a reply taken over by its client's new socket says (as the page says of a reply its dropped socket cut).
TAKEN_OVER_NOTE = "The connection dropped; the reply was stopped when the conversation went on from a new one."


def messages_take_over(*, conversation_id: int, client: str) -> tuple[TakenOver, ...]:
    """Close the replies streaming in the conversation for ``client``, which sends there again from another socket:
    ``cancelled``, their checkpointed text kept until their turn's final write brings the rest. Called under the
    conversation's lock (``chat_turn_begin``), so no reply begins there between the read and the write; one that
    ends meanwhile is left as it ended, and telling its turn changes nothing."""
    streaming = Message.objects.filter(
        conversation_id=conversation_id, role=Role.ASSISTANT, status=MessageStatus.STREAMING, stream_client=client
    )
    taken = tuple(TakenOver(pk, channel) for pk, channel in streaming.values_list("pk", "stream_channel"))
    if taken:
        streaming.filter(pk__in=[reply.message_id for reply in taken]).update(
            status=MessageStatus.CANCELLED, error_message=TAKEN_OVER_NOTE
        )
    return taken


def message_content_save(*, message_id: int, content: str, reasoning: str = "") -> bool:
    """Checkpoint a reply (and the model's reasoning before it) while it streams, so a reload (or a crash) shows
    what was written so far. False when the reply no longer streams: closed by another writer (taken over by its
    client's new socket, closed as abandoned), and its turn should stop."""
    return bool(
        Message.objects.filter(pk=message_id, status=MessageStatus.STREAMING).update(
            content=text_storable(content), reasoning=text_storable(reasoning)
        )
    )


def message_heartbeat(*, message_id: int) -> bool:
    """Say that the reply is still streaming, alive in the process that streams it (``messages_abandoned``);
    a reply already finished (or closed as abandoned, or taken over) is left as it is, and the answer is False."""
    return bool(
        Message.objects.filter(pk=message_id, status=MessageStatus.STREAMING).update(heartbeat_at=timezone.now())
    )


def message_finish(
    *,
    message_id: int,
    content: str,
    status: MessageStatus,
    error_message: str | None = "",
    model_name: str | None = None,
    provider_name: str | None = None,
    reasoning: str = "",
    finish_reason: str = "",
) -> None:
    """The reply's final text, the model's reasoning before it, its status and (complete) why it ended.
    ``model_name`` / ``provider_name``: who answered, when routing chose another provider (a deployment) or model
    (a fallback) than the reply was begun with. ``error_message`` None keeps the one the reply has (the note of
    whoever closed it before its turn's final write)."""
    fields: dict[str, object] = {
        "content": text_storable(content),
        "reasoning": text_storable(reasoning),
        "status": status,
        "finish_reason": text_storable(finish_reason, 32),
    }
    if error_message is not None:
        fields["error_message"] = text_storable(error_message, 500)
    if model_name is not None:
        fields["model_name"] = model_name
    if provider_name is not None:
        fields["provider_name"] = provider_name
    Message.objects.filter(pk=message_id).update(**fields)


@transaction.atomic
def conversation_update(
    *,
    conversation: Conversation,
    title: str | None = None,
    system_prompt: str | None = None,
    archived: bool | None = None,
) -> Conversation:
    fields = []
    if title is not None:
        conversation.title = title.strip()
        fields.append("title")
    if system_prompt is not None:
        conversation.system_prompt = system_prompt
        fields.append("system_prompt")
    if archived is not None:
        conversation.archived = archived
        fields.append("archived")
    if fields:
        conversation.save(update_fields=[*fields, "updated_at"])
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    conversation.delete()


@transaction.atomic
def message_feedback_set(*, message: Message, value: int | None, comment: str = "") -> Message:
    """Thumbs up (1), down (-1) or cleared (None) on a reply; the comment goes with the vote.

    The reply's request gets the same ``experiments.Feedback`` record as ``POST /v1/feedback`` gives it
    (metric "thumbs", source "chat"), which experiment results count; clearing the thumbs removes it."""
    if message.role != Role.ASSISTANT:
        raise ApplicationError("Only replies take feedback.", param="message", code="invalid_value")
    message.feedback = value
    message.feedback_comment = comment if value is not None else ""
    message.save(update_fields=["feedback", "feedback_comment"])
    if message.request_id:
        if value is None:
            feedback_clear(request_id=message.request_id, metric=FeedbackMetric.THUMBS)
        else:
            feedback_set(
                request_id=message.request_id,
                user_id=message.conversation.owner_id,
                metric=FeedbackMetric.THUMBS,
                value=float(value),
                comment=message.feedback_comment,
                source=FeedbackSource.CHAT,
            )
    return message


def messages_close_abandoned(*, now: datetime | None = None, conversation_id: int | None = None) -> int:
    """Mark replies left ``streaming`` by a crashed server as cancelled, keeping the text they had (in one
    conversation, with ``conversation_id``)."""
    abandoned = messages_abandoned(now=now or timezone.now())
    if conversation_id is not None:
        abandoned = abandoned.filter(conversation_id=conversation_id)
    return abandoned.update(
        status=MessageStatus.CANCELLED, error_message="The reply did not finish: the server stopped while it streamed."
    )
