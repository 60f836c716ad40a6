"""The user admin with each user's role (accounts.roles) in the list, and the identity-provider identities
a user signs in with (read-only: they are made by JWT sign-in). A role is changed with the user's groups."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group
from django.db.models import Q

from core.admin_delete import BoundedDeleteConfirmation

from .models import ExternalIdentity
from .roles import role_from_groups
from .selectors import users_named_q
from .services import users_delete


class ExternalIdentityInline(admin.TabularInline):
    model = ExternalIdentity
    fields = ("issuer", "subject", "created_at", "last_seen_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False


class RoleChangeList(ChangeList):
    """The list's page of users with their groups (the role column), read in one query. Only the page's: the
    list's queryset is also what an action takes, every user selected across the list, whose groups read at once
    were an ``IN`` of every one of them (a delete of more users than a statement can name was a 500)."""

    def get_results(self, request: Any) -> None:
        super().get_results(request)
        self.result_list = self.result_list.prefetch_related("groups")


User = get_user_model()
admin.site.unregister(User)


@admin.register(User)
class RoleUserAdmin(BoundedDeleteConfirmation, UserAdmin):
    list_display = (*UserAdmin.list_display, "role")
    show_full_result_count = False  # hundreds of thousands of users: one count a view
    inlines = (*UserAdmin.inlines, ExternalIdentityInline)
    search_help_text = "A username or email written out exactly (any case), or the start of a username (as written)."

    def get_search_results(self, request: Any, queryset: Any, search_term: str) -> tuple[Any, bool]:
        # Through the users' indexes (also the autocomplete of the user fields of keys and plans): the whole
        # username or email (UPPER(…) indexes), or the start of the username (its pattern index); Django's
        # LIKE '%term%' on four columns in any case read every user.
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(users_named_q(term) | Q(username__startswith=term)), False

    def get_inlines(self, request: Any, obj: Any) -> Any:
        # None on the add form: a new user has no identities, and its form stays what it always was.
        return super().get_inlines(request, obj) if obj is not None else ()

    def get_changelist(self, request: Any, **kwargs: Any) -> type[ChangeList]:
        return RoleChangeList

    # Deleting goes through the service: a batch of users at a time, each user's own provider keys recorded.
    def delete_model(self, request: Any, obj: Any) -> None:
        users_delete(user_ids=[obj.pk])

    def delete_queryset(self, request: Any, queryset: Any) -> None:
        users_delete(user_ids=queryset.values_list("pk", flat=True))

    @admin.display(description="role")
    def role(self, user: Any) -> str:
        names = [group.name for group in user.groups.all()]  # prefetched: no query per row
        return role_from_groups(names, is_superuser=user.is_superuser, is_staff=user.is_staff).value


admin.site.unregister(Group)


@admin.register(Group)
class RoleGroupAdmin(BoundedDeleteConfirmation, GroupAdmin):
    """Django's, but for its delete page: a role's group holds every user of the role (accounts.roles), a row each
    on Django's page."""
