"""Admin for users' own provider keys (bring your own key). Staff see whose key it is, for which provider, its
hint and status, and may check a key again or delete it; they never read it: the key has no field here, not
even a masked one, and nobody types one in (its owner adds and replaces it on the provider keys page or over
REST). Deleting and checking go through the services, which record them in the audit log."""

from __future__ import annotations

import dataclasses
import logging

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from accounts.admin_search import UserSearch
from audit.context import origin_current
from core.exceptions import ApplicationError
from core.paginators import EstimatedCountPaginator

from .models import CredentialStatus, ProviderCredential
from .services.credentials import provider_credential_delete, provider_credential_validate
from .tasks_credentials import provider_credentials_revalidate_selected

logger = logging.getLogger(__name__)

# At most this many keys are checked within the admin's request, each a live call to its provider (up to its
# timeout); more are queued for a worker (``provider_credentials_revalidate_selected``).
CHECKED_IN_THE_REQUEST = 10

# Everything on the change page, read-only; ``api_key`` is not among them.
_SHOWN_FIELDS = (
    "owner",
    "provider",
    "label",
    "hint",
    "status",
    "status_detail",
    "last_validated_at",
    "created_at",
    "rotated_at",
    "updated_at",
    "confirmed_origin",
)


@admin.register(ProviderCredential)
class ProviderCredentialAdmin(UserSearch, admin.ModelAdmin):
    list_display = (
        "owner",
        "provider",
        "label",
        "hint",
        "status_shown",
        "last_validated_at",
        "created_at",
        "rotated_at",
    )
    # A key a user and provider (docs/ledger.md, "The admin at scale"): the providers from their own table (the
    # filter of those with keys read every key's provider, SELECT DISTINCT), days by the date filter (the date
    # hierarchy read every key's years), newest first off the primary key (the model's order, by owner and the
    # joined provider's name, sorted every key), one count.
    list_filter = ("provider", "status", "created_at")
    ordering = ("-id",)
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_select_related = ("owner", "provider")
    # The owner named whole (UserSearch): LIKE '%term%' on four of their columns read every key and every user.
    user_field = "owner"
    search_fields = ("owner__username", "owner__email")
    search_help_text = "The owner's username or email, written out exactly (any case)."
    actions = ("revalidate",)
    fields = _SHOWN_FIELDS
    readonly_fields = _SHOWN_FIELDS

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a key is its owner's to give; staff never type one in

    def has_change_permission(self, request: HttpRequest, obj: ProviderCredential | None = None) -> bool:
        """A key's page is read-only (there is nothing on it for staff to edit); the permission still counts
        on the list, where it allows the "check again" action."""
        return obj is None and super().has_change_permission(request)

    @admin.display(description="status", ordering="status")
    def status_shown(self, obj: ProviderCredential) -> str:
        """The status, with the provider's reason for refusing the key (or why it is paused) as its tooltip."""
        label = "Paused" if obj.host_paused else CredentialStatus(obj.status).label
        return format_html('<span title="{}">{}</span>', obj.shown_status_detail, label)

    @admin.action(description="Check selected keys again with their providers", permissions=["change"])
    def revalidate(self, request: HttpRequest, queryset: QuerySet[ProviderCredential]) -> None:
        selected = list(queryset.order_by("pk").values_list("pk", flat=True)[: CHECKED_IN_THE_REQUEST + 1])
        if len(selected) > CHECKED_IN_THE_REQUEST:
            self._revalidate_queue(request, list(queryset.order_by("pk").values_list("pk", flat=True)))
            return
        for credential in queryset.filter(pk__in=selected).select_related("owner", "provider"):
            name = str(credential)
            try:
                accepted = provider_credential_validate(credential=credential)
            except ApplicationError as exc:  # the provider could not be asked: the status is left as it was
                self.message_user(request, f"{name}: not checked: {exc.message}", messages.WARNING)
                continue
            except Exception:
                logger.exception("checking provider credential %s failed", credential.pk)
                self.message_user(request, f"{name}: not checked; see the server log.", messages.ERROR)
                continue
            if accepted:
                self.message_user(request, f"{name}: valid.", messages.SUCCESS)
            else:
                self.message_user(request, f"{name}: refused: {credential.status_detail}", messages.ERROR)

    def _revalidate_queue(self, request: HttpRequest, credential_ids: list[int]) -> None:
        origin = origin_current()
        try:
            provider_credentials_revalidate_selected.delay(
                credential_ids, dataclasses.asdict(origin) if origin is not None else None
            )
        except Exception as exc:  # kombu's OperationalError, or whatever else the publish met; its text may name hosts
            self.message_user(
                request,
                f"The check of the {len(credential_ids)} selected keys could not be queued (the task broker did not "
                f"answer: {type(exc).__name__}); nothing was checked. Try again once it answers.",
                messages.ERROR,
            )
            return
        self.message_user(
            request,
            f"Queued: a worker checks the {len(credential_ids)} selected keys again with their providers, "
            f"{max(1, settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY)} at a time; refresh this page to see each one's "
            "status as it is checked.",
            messages.SUCCESS,
        )

    def delete_model(self, request: HttpRequest, obj: ProviderCredential) -> None:
        provider_credential_delete(credential=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ProviderCredential]) -> None:
        for credential in queryset.select_related("owner", "provider"):
            provider_credential_delete(credential=credential)
