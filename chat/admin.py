from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from core.paginators import EstimatedCountPaginator
from providers.admin_filters import CatalogModelNameFilter

from .models import Conversation, Message


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    can_delete = False
    fields = ["role", "content", "model_name", "provider_name", "status", "request_id", "feedback", "created_at"]
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["title", "owner", "model_name", "archived", "updated_at"]
    list_filter = ["archived", "model_name"]
    search_fields = ["title", "owner__username"]
    list_select_related = ["owner"]
    raw_id_fields = ["owner"]
    readonly_fields = ["created_at", "updated_at"]
    inlines = [MessageInline]


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
