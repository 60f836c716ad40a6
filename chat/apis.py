"""REST for the chat page: the user's conversations, feedback on replies and the model catalog.

Every view reads through ``chat.selectors`` with what the caller reaches (``ConversationReach``): a
person all of their conversations, a gateway key only the ones it or a key created under it started,
unless it holds the ``conversations:manage`` scope. Another user's conversation or message, or one out of
the key's reach, answers 404 exactly like a missing one. Every view needs a role that may chat: a viewer
(accounts.roles) gets 403.
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_field, extend_schema_serializer
from rest_framework import permissions, serializers, status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import CanChat
from billing.selectors import CatalogEntry, models_catalog_for
from billing.services.keys import KeyPrincipal
from core.openapi import error_responses

from . import selectors, services
from .callers import caller_for_request
from .models import Feedback, Message

_TAGS = ["Conversations"]
# What the schema says of a gateway key on these endpoints.
_KEY_REACH = (
    " A gateway key reaches only the conversations started (over the WebSocket) by itself or by the keys created "
    "under it, unless it holds the `conversations:manage` scope; any other answers 404, like a missing one."
)
# A viewer (accounts.roles) may not chat, so neither read conversations nor the picker's catalog.
_CHAT_PERMISSIONS = [permissions.IsAuthenticated, CanChat]


def _reach(request: Request) -> selectors.ConversationReach:
    return selectors.conversation_reach(caller_for_request(request))


@extend_schema_serializer(component_name="MessageUsage")
class MessageUsageSerializer(serializers.Serializer):
    """A reply's figures from its ledger row (billing's UsageRecord), the source of truth for spend."""

    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cost = serializers.DecimalField(max_digits=20, decimal_places=10, help_text="USD.")
    estimated = serializers.BooleanField(
        source="usage_estimated", help_text="The provider reported no usage (a stopped reply): tokens were counted."
    )


@extend_schema_serializer(component_name="ChatMessage")
class MessageOutputSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model_name")
    provider = serializers.CharField(source="provider_name")
    reasoning = serializers.CharField(
        read_only=True,
        help_text="A reasoning model's reasoning before its reply, as it streamed; empty when there was none.",
    )
    finish_reason = serializers.CharField(
        read_only=True,
        help_text="Why a complete reply ended, as the provider said: `stop`, or `length` when it was cut at its output "
        "limit (the model's, or the most your budget or token quota still paid for); empty for the other replies.",
    )
    usage = MessageUsageSerializer(
        source="usage_record",
        allow_null=True,
        read_only=True,
        help_text="What the reply was billed, stopped replies included; null for your own messages and until "
        "the ledger row is written, a moment after the reply ends.",
    )

    class Meta:
        model = Message
        fields = [
            "id",
            "role",
            "content",
            "reasoning",
            "model",
            "provider",
            "request_id",
            "status",
            "finish_reason",
            "error_message",
            "feedback",
            "feedback_comment",
            "usage",
            "created_at",
        ]


class ConversationSummarySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    title = serializers.CharField()
    model = serializers.CharField(source="model_name")
    archived = serializers.BooleanField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class ConversationListApi(APIView):
    permission_classes = _CHAT_PERMISSIONS
    pagination_class = LimitOffsetPagination

    @extend_schema_serializer(component_name="ConversationSummary")
    class OutputSerializer(ConversationSummarySerializer):
        pass

    class FilterSerializer(serializers.Serializer):
        before_updated_at = serializers.DateTimeField(
            required=False, help_text="With `before_id`: the `updated_at` of the last conversation listed."
        )
        before_id = serializers.IntegerField(
            required=False, min_value=1, max_value=2**63 - 1, help_text="With `before_updated_at`: its `id`."
        )

        def validate(self, attrs: dict) -> dict:
            if ("before_updated_at" in attrs) != ("before_id" in attrs):
                raise serializers.ValidationError(
                    {"before_id": "Give both before_updated_at and before_id (the last conversation listed's)."}
                )
            return attrs

    @extend_schema(
        tags=_TAGS,
        operation_id="conversations_list",
        summary="List your conversations",
        description="Not archived, most recently active first. Sending into an archived conversation unarchives it. "
        "To page through them all, pass the last listed conversation's `updated_at` and `id` as `before_updated_at` "
        "and `before_id`: the next ones, none skipped or repeated as replies move conversations to the top."
        + _KEY_REACH,
        parameters=[FilterSerializer],
        responses={200: OutputSerializer(many=True), **error_responses(400, 401)},
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        cursor = filters.validated_data
        before = (cursor["before_updated_at"], cursor["before_id"]) if "before_id" in cursor else None
        conversations = selectors.conversation_list(reach=_reach(request), before=before)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(conversations, request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


class ConversationDetailApi(APIView):
    permission_classes = _CHAT_PERMISSIONS

    @extend_schema_serializer(component_name="ConversationUpdate")
    class InputSerializer(serializers.Serializer):
        title = serializers.CharField(max_length=200, required=False)
        system_prompt = serializers.CharField(max_length=20_000, required=False, allow_blank=True)
        archived = serializers.BooleanField(required=False)

    @extend_schema_serializer(component_name="Conversation")
    class OutputSerializer(ConversationSummarySerializer):
        system_prompt = serializers.CharField()
        messages = serializers.SerializerMethodField()

        @extend_schema_field(MessageOutputSerializer(many=True))
        def get_messages(self, conversation) -> list[dict]:
            rows = selectors.conversation_messages(conversation=conversation)
            return MessageOutputSerializer(rows, many=True).data

    @extend_schema(
        tags=_TAGS,
        operation_id="conversations_retrieve",
        summary="A conversation with its messages",
        description=_KEY_REACH.strip(),
        responses={200: OutputSerializer, **error_responses(401, 404)},
    )
    def get(self, request: Request, pk: int) -> Response:
        conversation = selectors.conversation_get(reach=_reach(request), conversation_id=pk)
        return Response(self.OutputSerializer(conversation).data)

    @extend_schema(
        tags=_TAGS,
        operation_id="conversations_update",
        summary="Rename a conversation, set its system prompt or archive it",
        description=_KEY_REACH.strip(),
        request=InputSerializer,
        responses={200: OutputSerializer, **error_responses(400, 401, 404)},
    )
    def patch(self, request: Request, pk: int) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        conversation = selectors.conversation_get(reach=_reach(request), conversation_id=pk)
        conversation = services.conversation_update(conversation=conversation, **serializer.validated_data)
        return Response(self.OutputSerializer(conversation).data)

    @extend_schema(
        tags=_TAGS,
        operation_id="conversations_destroy",
        summary="Delete a conversation and its messages",
        description="The usage ledger keeps its rows: spend does not disappear with the conversation." + _KEY_REACH,
        responses={204: None, **error_responses(401, 404)},
    )
    def delete(self, request: Request, pk: int) -> Response:
        conversation = selectors.conversation_get(reach=_reach(request), conversation_id=pk)
        services.conversation_delete(conversation=conversation)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MessageFeedbackApi(APIView):
    permission_classes = _CHAT_PERMISSIONS

    @extend_schema_serializer(component_name="MessageFeedback")
    class InputSerializer(serializers.Serializer):
        value = serializers.ChoiceField(choices=Feedback.choices, allow_null=True, help_text="1, -1, or null to clear.")
        comment = serializers.CharField(max_length=2000, required=False, allow_blank=True, default="")

    OutputSerializer = MessageOutputSerializer

    @extend_schema(
        tags=_TAGS,
        operation_id="messages_feedback",
        summary="Thumbs up or down on a reply",
        description=_KEY_REACH.strip(),
        request=InputSerializer,
        responses={200: OutputSerializer, **error_responses(400, 401, 404)},
    )
    def post(self, request: Request, pk: int) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        message = selectors.message_get(reach=_reach(request), message_id=pk)
        message = services.message_feedback_set(message=message, **serializer.validated_data)
        return Response(self.OutputSerializer(message).data)


@extend_schema_serializer(component_name="ModelCapabilities")
class ModelCapabilitiesSerializer(serializers.Serializer):
    streaming = serializers.BooleanField(source="supports_streaming")
    tools = serializers.BooleanField(source="supports_tools")
    vision = serializers.BooleanField(source="supports_vision")
    json_mode = serializers.BooleanField(source="supports_json_mode")
    reasoning = serializers.BooleanField(
        source="supports_reasoning", help_text="It reasons when asked with `reasoning_effort`."
    )


@extend_schema_serializer(component_name="PriceRange")
class PriceRangeSerializer(serializers.Serializer):
    """USD per million tokens: the cheapest and the dearest of the model's deployments."""

    min = serializers.DecimalField(max_digits=12, decimal_places=6)
    max = serializers.DecimalField(max_digits=12, decimal_places=6)


class ModelListApi(APIView):
    """The catalog for a picker: every chat model, with the ones the caller may not use marked ``locked``."""

    permission_classes = _CHAT_PERMISSIONS

    @extend_schema_serializer(component_name="CatalogModel")
    class OutputSerializer(serializers.Serializer):
        id = serializers.CharField(source="model.name", help_text="The public name to send as `model`.")
        label = serializers.CharField(source="model.label")
        providers = serializers.ListField(
            child=serializers.CharField(), help_text="The providers whose deployments serve it (its badges)."
        )
        capabilities = ModelCapabilitiesSerializer(source="model")
        context_window = serializers.IntegerField(source="model.context_window")
        max_output_tokens = serializers.IntegerField(source="model.max_output_tokens", allow_null=True)
        input_per_mtok = PriceRangeSerializer()
        output_per_mtok = PriceRangeSerializer()
        locked = serializers.BooleanField(
            help_text="Your plan (or this key) does not include it, or only your own provider key could serve it."
        )
        locked_reason = serializers.ChoiceField(
            choices=["plan", "key", "own_key"],
            allow_null=True,
            help_text="What excludes it (`own_key`: it needs your own key for one of `own_key_providers`, which "
            "you add at /provider-keys/); null when it is not locked.",
        )
        own_key_providers = serializers.ListField(
            child=serializers.CharField(),
            help_text="With `locked_reason: own_key`, the providers a key of your own would unlock it on.",
        )

        def to_representation(self, entry: CatalogEntry) -> dict:
            data = super().to_representation(entry)
            data["locked_reason"] = entry.locked_reason or None
            return data

    @extend_schema(
        tags=["Models"],
        operation_id="catalog_models_list",
        summary="The chat models of the catalog, with prices and what your plan includes",
        description="Every chat model (aliases under their own name). Models your plan or API key does not "
        "include, or that only your own provider key could serve while you have none, are listed with "
        "`locked: true` rather than left out; a request for one is refused with 403.",
        responses={200: OutputSerializer(many=True), **error_responses(401)},
    )
    def get(self, request: Request) -> Response:
        principal = request.auth
        entries = models_catalog_for(
            user_id=request.user.pk,
            key_allowed_model_ids=principal.allowed_model_ids if isinstance(principal, KeyPrincipal) else None,
        )
        return Response(self.OutputSerializer(entries, many=True).data)
