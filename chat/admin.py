from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from accounts.selectors import user_ids_named
from core.admin_delete import BoundedDeleteConfirmation
from core.paginators import EstimatedCountPaginator
from providers.admin_filters import CatalogModelNameFilter

from .models import Conversation, Message, StoredResponse
from .selectors import stored_responses_dead, stored_responses_removal
from .services_responses import stored_responses_remove


class MessageInline(admin.TabularInline):
    """A conversation's latest messages (``ConversationAdmin.get_formset_kwargs``): a long one has thousands,
    and its page would render every one."""

    model = Message
    extra = 0
    can_delete = False
    fields = ["role", "content", "model_name", "provider_name", "status", "request_id", "feedback", "created_at"]
    readonly_fields = fields
    show_change_link = True
    shown = 50

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(BoundedDeleteConfirmation, admin.ModelAdmin):
    list_display = ["title", "owner", "model_name", "archived", "updated_at"]
    list_filter = ["archived", CatalogModelNameFilter]
    # As the messages' list (docs/ledger.md, "The admin at scale"): newest first off the primary key (the
    # model's own order, by updated_at, has an index only per owner), one count, a search through indexes.
    ordering = ["-id"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    search_fields = ["title"]  # see get_search_results
    search_help_text = "A user's username or email, or a conversation's id, written out exactly."
    list_select_related = ["owner"]
    raw_id_fields = ["owner"]
    readonly_fields = ["created_at", "updated_at", "api_key", "all_messages"]
    inlines = [MessageInline]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Conversation], search_term: str
    ) -> tuple[QuerySet[Conversation], bool]:
        # Whole values: the owners through the users' table, then their rows in the sidebar's (owner, …) index;
        # LIKE '%term%' on the titles and the joined usernames read every conversation.
        term = search_term.strip()
        if not term:
            return queryset, False
        named = Q(owner_id__in=user_ids_named(term))
        if term.isdigit():
            named |= Q(pk=int(term))
        return queryset.filter(named), False

    def get_formset_kwargs(
        self, request: HttpRequest, obj: Conversation, inline: admin.options.InlineModelAdmin, prefix: str
    ) -> dict[str, Any]:
        kwargs = super().get_formset_kwargs(request, obj, inline, prefix)
        if isinstance(inline, MessageInline) and obj.pk is not None:
            latest = Message.objects.filter(conversation=obj).order_by("-created_at", "-id")[: inline.shown]
            # Ids, not the slice itself: the inline's formset filters what it is given by conversation.
            kwargs["queryset"] = Message.objects.filter(pk__in=list(latest.values_list("pk", flat=True)))
        return kwargs

    @admin.display(description="messages")
    def all_messages(self, conversation: Conversation) -> str:
        if conversation.pk is None:
            return "-"
        count = conversation.messages.count()
        url = reverse("admin:chat_message_changelist") + f"?conversation__id__exact={conversation.pk}"
        shown = f"the latest {MessageInline.shown} are below" if count > MessageInline.shown else "all are below"
        return format_html('{} ({}); <a href="{}">list them all</a>', count, shown, url)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    """Read-mostly: replies are written by the chat, the admin looks at them and at the feedback."""

    list_display = ["id", "conversation", "role", "status", "model_name", "feedback", "created_at"]
    list_filter = ["role", "status", "feedback", CatalogModelNameFilter]
    # A table of millions of rows (docs/ledger.md, "The admin at scale"): newest first off the primary key (the
    # model's own order, by an unindexed created_at, sorted every row), one count, a search through an index.
    ordering = ["-id"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    search_fields = ["request_id"]  # see get_search_results
    search_help_text = "A reply's request id, written out exactly (the ledger's request id)."
    list_select_related = ["conversation"]
    raw_id_fields = ["conversation"]
    readonly_fields = ["request_id", "usage_record", "created_at"]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Message], search_term: str
    ) -> tuple[QuerySet[Message], bool]:
        # Whole, in request_id's index: LIKE '%term%' over the messages' text read every message.
        term = search_term.strip()
        return (queryset.filter(request_id=term) if term else queryset), False


class StoredResponseStatusFilter(admin.SimpleListFilter):
    """The statuses a stored response can have (a failed one is not kept), named here: Django's filter of a field
    without choices lists them with a SELECT DISTINCT over the whole table, unindexed, on every load of the list."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("completed", "completed"), ("incomplete", "incomplete")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[StoredResponse]) -> QuerySet[StoredResponse]:
        return queryset.filter(status=self.value()) if self.value() else queryset


class StoredResponseHiddenFilter(admin.SimpleListFilter):
    """Those gone for their owner (a 404) but kept for the chains of live responses that continue them: deleted by
    their owner, or expired (``chat.services_responses``); each through an index."""

    title = "hidden"
    parameter_name = "hidden"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("deleted", "deleted, kept for a chain"), ("expired", "expired, kept for a chain"), ("no", "no")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[StoredResponse]) -> QuerySet[StoredResponse]:
        now = timezone.now()
        if self.value() == "deleted":
            return queryset.filter(deleted_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(deleted_at__isnull=True, expires_at__lte=now)
        if self.value() == "no":
            return queryset.exclude(stored_responses_dead(now))
        return queryset


@admin.register(StoredResponse)
class StoredResponseAdmin(BoundedDeleteConfirmation, admin.ModelAdmin):
    """Read-only, as a conversation's messages are shown: written by ``POST /v1/responses``, read (or deleted) by
    their owner over ``/v1/responses/{id}``, deleted at the end of their retention. A chained one holds its own input
    items and names the one it continued (``previous``); one hidden (deleted or expired, kept for a chain) says so.
    An admin's delete removes the data: the response, every response that continues it, and the hidden ones before
    it kept for it alone (``stored_responses_removal``), all listed on the confirmation page."""

    list_display = ["response_id", "owner", "model_name", "status", "hidden", "created_at", "expires_at"]
    list_filter = [StoredResponseStatusFilter, StoredResponseHiddenFilter, CatalogModelNameFilter]
    ordering = ["-id"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    search_fields = ["response_id"]  # see get_search_results
    search_help_text = "A response's id (resp_…), or its owner's username or email, written out exactly."
    list_select_related = ["owner"]
    fields = readonly_fields = [
        "response_id",
        "owner",
        "api_key",
        "model_name",
        "status",
        "previous",
        "deleted_at",
        "instructions",
        "input_items",
        "output_items",
        "usage",
        "response",
        "created_at",
        "expires_at",
    ]

    # What a response holds (megabytes, for a long chain's every turn or its images as data URLs).
    held = ("input_items", "output_items", "instructions", "usage", "response")

    def get_queryset(self, request: HttpRequest) -> QuerySet[StoredResponse]:
        queryset = super().get_queryset(request)
        if request.resolver_match is not None and request.resolver_match.url_name.endswith("_changelist"):
            # The list shows ids, owners and dates; a response's own page shows what it holds (megabytes, for a
            # long chain's every turn or its images as data URLs).
            return queryset.defer(*self.held)
        return queryset

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[StoredResponse], search_term: str
    ) -> tuple[QuerySet[StoredResponse], bool]:
        # Whole values, through indexes (the unique id, the owner's); never LIKE over the stored conversations.
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(response_id=term) | Q(owner_id__in=user_ids_named(term))), False

    @admin.display(description="hidden")
    def hidden(self, stored: StoredResponse) -> str | None:
        """Gone for its owner, kept for a chain: ``deleted`` by them or ``expired``; None: not hidden."""
        if stored.deleted_at is not None:
            return "deleted"
        return "expired" if stored.expires_at <= timezone.now() else None

    def get_deleted_objects(
        self, objs: QuerySet[StoredResponse] | list[StoredResponse], request: HttpRequest
    ) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
        # What the delete takes (stored_responses_removal: those continuing them are not protecting them), its first
        # rows listed without what they hold and the rest counted (BoundedDeleteConfirmation).
        if isinstance(objs, QuerySet):
            selection = objs
        else:
            selection = StoredResponse.objects.filter(pk__in=[stored.pk for stored in objs])
        taken = stored_responses_removal(list(selection.values_list("pk", flat=True)))
        shown = list(StoredResponse.objects.filter(pk__in=taken[: self.delete_listed]).defer(*self.held))
        return self.deleted_objects_bounded(shown, selection, request, totals={StoredResponse: len(taken)})

    def delete_model(self, request: HttpRequest, obj: StoredResponse) -> None:
        stored_responses_remove([obj.pk])

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[StoredResponse]) -> None:
        stored_responses_remove(list(queryset.values_list("pk", flat=True)))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: StoredResponse | None = None) -> bool:
        return False
