"""The user admin with each user's role (accounts.roles) in the list, and the identity-provider identities
a user signs in with (read-only: they are made by JWT sign-in). A role is changed with the user's groups."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from .models import ExternalIdentity
from .roles import role_from_groups


class ExternalIdentityInline(admin.TabularInline):
    model = ExternalIdentity
    fields = ("issuer", "subject", "created_at", "last_seen_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False


User = get_user_model()
admin.site.unregister(User)


@admin.register(User)
class RoleUserAdmin(UserAdmin):
    list_display = (*UserAdmin.list_display, "role")
    inlines = (*UserAdmin.inlines, ExternalIdentityInline)

    def get_inlines(self, request: Any, obj: Any) -> Any:
        # None on the add form: a new user has no identities, and its form stays what it always was.
        return super().get_inlines(request, obj) if obj is not None else ()

    def get_queryset(self, request: Any) -> Any:
        return super().get_queryset(request).prefetch_related("groups")

    @admin.display(description="role")
    def role(self, user: Any) -> str:
        names = [group.name for group in user.groups.all()]  # prefetched: no query per row
        return role_from_groups(names, is_superuser=user.is_superuser, is_staff=user.is_staff).value
