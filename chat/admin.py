from __future__ import annotations

from django.contrib import admin

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
    list_filter = ["role", "status", "feedback", "model_name"]
    search_fields = ["content", "request_id", "conversation__title"]
    list_select_related = ["conversation"]
    raw_id_fields = ["conversation"]
    readonly_fields = ["request_id", "usage_record", "created_at"]
