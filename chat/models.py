from __future__ import annotations

from django.conf import settings
from django.db import models

TITLE_MAX_LENGTH = 60


class Conversation(models.Model):
    """A chat thread on the web page or over the WebSocket; its messages are the model's context."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    # The gateway key that started it (over the WebSocket); null when a person did. A key without the
    # ``conversations:manage`` scope reaches only those it or its subtree started (``ConversationReach``). SET_NULL: a
    # deleted key reaches nothing, and its conversations stay their owner's, as its ledger rows do.
    api_key = models.ForeignKey(
        "billing.ApiKey",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
        help_text="The gateway key that started it; empty when its owner did.",
    )
    title = models.CharField(max_length=200, blank=True, help_text="Taken from the first message; renamable.")
    # The public name, not a FK: the catalog may rename or drop a model and the thread must stay readable.
    model_name = models.CharField(max_length=128, blank=True)
    system_prompt = models.TextField(blank=True)
    archived = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at", "-id"]
        indexes = [
            # The sidebar: one user's live conversations, most recently active first.
            models.Index(fields=["owner", "archived", "-updated_at"], name="chat_conv_sidebar_idx"),
        ]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class Role(models.TextChoices):
    SYSTEM = "system", "System"
    USER = "user", "User"
    ASSISTANT = "assistant", "Assistant"


class MessageStatus(models.TextChoices):
    COMPLETE = "complete", "Complete"
    STREAMING = "streaming", "Streaming"
    CANCELLED = "cancelled", "Cancelled"
    ERROR = "error", "Error"


class Feedback(models.IntegerChoices):
    UP = 1, "Thumbs up"
    DOWN = -1, "Thumbs down"


class Message(models.Model):
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    # A reasoning model's reasoning before its reply, as the chat page shows it (empty: none, or a user's message).
    reasoning = models.TextField(blank=True, default="", db_default="")
    model_name = models.CharField(max_length=128, blank=True)
    provider_name = models.CharField(max_length=64, blank=True)
    # The ledger row is written in the background after the reply ends, so it may not exist yet when this
    # row is saved: a plain reference by request_id, without a database constraint.
    usage_record = models.ForeignKey(
        "billing.UsageRecord",
        to_field="request_id",
        db_constraint=False,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        related_name="+",
    )
    request_id = models.CharField(max_length=64, blank=True, db_index=True)
    status = models.CharField(max_length=16, choices=MessageStatus.choices, default=MessageStatus.COMPLETE)
    # Why a complete reply ended, as the provider said (``stop``, ``length``…): a reply cut at its output limit
    # (``length``: the model's, or the most a budget or token quota still paid for) reads as whole without it.
    finish_reason = models.CharField(max_length=32, blank=True, default="", db_default="")
    error_message = models.CharField(max_length=500, blank=True)
    feedback = models.SmallIntegerField(choices=Feedback.choices, null=True, blank=True)
    feedback_comment = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # A reply's liveness while it is ``streaming``: the process streaming it stamps this every
    # LLMHUB_CHAT_HEARTBEAT_INTERVAL seconds, so a reply whose process died is known dead within seconds
    # (``chat.selectors.messages_abandoned``). Null on rows from before it existed.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Who streams a reply: the client that sent it (the chat page's load, a program's own id: ``chat.send``'s
    # ``client``), empty when it named none. A send of that client from another socket into the conversation takes the
    # reply over (``chat.services.chat_turn_begin``): the socket it streams on is one the client has lost.
    stream_client = models.CharField(max_length=64, blank=True, default="", db_default="")
    # Where a reply streams: the channel-layer name of the consumer whose socket carries it (Channels' names are at
    # most 100 characters), which a takeover tells at once, in whichever process it runs (``chat.services_turn``);
    # empty when nothing carries it on a channel (a turn driven without a consumer, rows from before).
    stream_channel = models.CharField(max_length=100, blank=True, default="", db_default="")

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["conversation", "created_at"], name="chat_msg_conv_created_idx"),
            # The replies streaming now, a handful in a table of every message ever sent: the beat's sweep of
            # abandoned replies (``chat.selectors.messages_abandoned``) reads them here, not the whole table.
            models.Index(
                fields=["heartbeat_at"], condition=models.Q(status="streaming"), name="chat_msg_streaming_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"


class StoredResponse(models.Model):
    """A response of ``POST /v1/responses`` made with ``store`` (OpenAI's default), kept for
    ``LLMHUB_RESPONSES_RETENTION_DAYS``: what ``GET /v1/responses/{id}`` returns, and what a later request's
    ``previous_response_id`` continues (its input items, then its output items). Users' conversation data, like
    ``Message``: never logged. Owned as a ``Conversation`` is, and reached by the same rule (``ConversationReach``):
    gone with its user; its key's deletion leaves it its owner's."""

    response_id = models.CharField(max_length=80, unique=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey(
        "billing.ApiKey",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
        help_text="The gateway key that made it; empty when its owner did (a JWT), or once the key is deleted.",
    )
    model_name = models.CharField(max_length=128)
    status = models.CharField(max_length=16)
    # The response it continued (``previous_response_id``), by reference: its input items are only those the request
    # brought, and the whole input it answered is its previous responses' input and output items, then these
    # (``chat.selectors.stored_response_input``). Null: none, and ``input_items`` is the whole input (a chain's first
    # response; a chain too long to follow further, kept whole again; and every row from before references, which
    # kept each its whole input). One that others continue cannot be deleted (they could not be read whole): its
    # owner's delete hides it (``deleted_at``), and it goes when none refers to it any more; its user's deletion
    # takes the whole chain, an admin's delete it and those continuing it (``stored_responses_remove``).
    previous = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.RESTRICT, related_name="+", editable=False
    )
    # The input items the request brought, as the Responses API's items with their ids (see ``previous``).
    # ``instructions`` apart, as OpenAI keeps them.
    input_items = models.JSONField(default=list)
    output_items = models.JSONField(default=list)
    # Null: none were given (the Response's ``null``), not the same as an empty string.
    instructions = models.TextField(null=True, blank=True)  # noqa: DJ001
    usage = models.JSONField(null=True, blank=True)
    # The rest of the ``Response`` as it was answered (tools, text format, metadata, sampling parameters, …).
    response = models.JSONField(default=dict)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)
    # When its owner deleted it while later responses continued it: gone for them (a 404, and not to be continued),
    # its items kept for those responses' chains until none refers to it (``stored_responses_expire``). Null: not.
    deleted_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # The hidden ones, a few among every stored response: the hourly task finds them here.
            models.Index(
                fields=["deleted_at"], condition=models.Q(deleted_at__isnull=False), name="chat_resp_deleted_idx"
            ),
        ]

    def __str__(self) -> str:
        return self.response_id
