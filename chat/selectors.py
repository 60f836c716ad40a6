"""Reads of conversations, always scoped to the user asking: another user's row is as absent as a missing one."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import QuerySet

from core.exceptions import ApplicationError

from .history import Turn
from .models import Conversation, Message, MessageStatus, Role


class NotFoundError(ApplicationError):
    """Also answers for rows of other users, so that ids cannot be probed."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


def conversation_list(*, user_id: int) -> QuerySet[Conversation]:
    return Conversation.objects.filter(owner_id=user_id, archived=False).order_by("-updated_at", "-id")


def conversation_get(*, user_id: int, conversation_id: int) -> Conversation:
    conversation = Conversation.objects.filter(owner_id=user_id, pk=conversation_id).first()
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


def turn_context(*, user_id: int, conversation_id: int | None) -> TurnContext:
    """The context of a new turn: empty for a new conversation (``conversation_id=None``)."""
    if conversation_id is None:
        return TurnContext()
    conversation = conversation_get(user_id=user_id, conversation_id=conversation_id)
    return TurnContext(conversation.system_prompt, tuple(conversation_turns(conversation=conversation)))


def message_get(*, user_id: int, message_id: int) -> Message:
    message = (
        Message.objects.select_related("conversation", "usage_record")
        .filter(pk=message_id, conversation__owner_id=user_id)
        .first()
    )
    if message is None:
        raise NotFoundError(f"No message {message_id}.", param="message")
    return message
