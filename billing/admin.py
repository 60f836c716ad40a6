"""Admin for billing. Keys are created and revoked through the key services; the ledger is read-only."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from accounts.admin_search import UserSearch
from accounts.selectors import user_ids_named
from core.admin_delete import BoundedDeleteConfirmation
from core.exceptions import ApplicationError
from core.paginators import EstimatedCountPaginator

from . import admin_ops_alerts, admin_plans  # noqa: F401  (ops alerts; plans, budget counters, alerts, daily usage)
from .models import ApiKey, KeyScope, UsageRecord
from .pricing import cache_write_1h_price, cache_write_price, cost_breakdown
from .services.keys import (
    api_key_change,
    api_key_create,
    api_key_delete,
    api_key_within_parent_check,
    api_keys_delete,
    api_keys_revoke,
    api_keys_rotate,
)

# API KEYS


class ApiKeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("active", "Active"), ("expired", "Expired"), ("revoked", "Revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
        now = timezone.now()
        not_expired = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        if self.value() == "active":
            return queryset.filter(not_expired, revoked_at__isnull=True)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True).exclude(not_expired)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


class ApiKeyChangeForm(forms.ModelForm):
    # The model keeps a JSON list; the admin offers the known scopes as checkboxes.
    scopes = forms.MultipleChoiceField(
        choices=KeyScope.choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Rights beyond calling models. A key created by this key can only get scopes this key holds.",
    )

    class Meta:
        model = ApiKey
        fields = ("name", "expires_at", "allowed_models", "scopes", "budget_usd", "budget_period", "rpm", "tpm")

    # As api_key_create (and the API) require, on the add page and the change page alike: a limit of 0 would be a key
    # that can make no request (revoke it instead).
    def clean_rpm(self) -> Any:
        return _at_least_one(self.cleaned_data.get("rpm"))

    def clean_tpm(self) -> Any:
        return _at_least_one(self.cleaned_data.get("tpm"))

    def clean(self) -> dict[str, Any]:
        """A key created by another key never has more than its parent (``api_key_within_parent_check``, as
        when it was created): what a request may do is bounded by every key above it anyway, but the change
        page must not show a child rights or limits it does not have."""
        cleaned = super().clean()
        parent = self.instance.parent if self.instance.pk is not None else None
        if parent is None or self.errors:
            return cleaned
        try:
            api_key_within_parent_check(
                parent,
                expires_at=cleaned.get("expires_at"),
                allowed_models=list(cleaned.get("allowed_models") or ()),
                budget_usd=cleaned.get("budget_usd"),
                budget_period=cleaned.get("budget_period") or "",
                rpm=cleaned.get("rpm"),
                tpm=cleaned.get("tpm"),
                scopes=sorted(cleaned.get("scopes") or ()),
            )
        except ApplicationError as exc:
            message = f"The key that created this one ({parent}) limits it. {exc.message}"
            self.add_error(exc.param if exc.param in self.fields else None, message)
        return cleaned


class ApiKeyAddForm(ApiKeyChangeForm):
    class Meta:
        model = ApiKey
        fields = (
            "user",
            "name",
            "expires_at",
            "allowed_models",
            "budget_usd",
            "budget_period",
            "rpm",
            "tpm",
            "scopes",
        )

    def clean_expires_at(self) -> Any:
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise forms.ValidationError("Give a moment in the future, or leave empty for a key that never expires.")
        return expires_at


def _at_least_one(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise forms.ValidationError("A rate limit must be at least 1, or empty for none.")
    return value


@admin.register(ApiKey)
class ApiKeyAdmin(UserSearch, BoundedDeleteConfirmation, admin.ModelAdmin):
    add_form = ApiKeyAddForm
    form = ApiKeyChangeForm
    list_display = ("prefix", "name", "user", "parent", "created_at", "last_used_at", "expires_at", "status")
    list_filter = (ApiKeyStatusFilter,)
    list_select_related = ("user", "parent")
    search_help_text = "A key's prefix (sk-llmhub-…), or its owner's username or email, written out exactly."
    # A key or more a user (docs/ledger.md, "The admin at scale"): newest first off the primary key (by created_at,
    # unindexed, sorted every key), one count.
    ordering = ("-id",)
    show_full_result_count = False
    actions = ("revoke_selected", "rotate_selected")
    autocomplete_fields = ("user",)

    def also_q(self, term: str) -> Q:
        # The prefix, whole, in its unique index (Django's LIKE '%term%' on the prefix, the name and the joined
        # username and email read every key and every user); a key's name means something only among its owner's.
        return Q(prefix=term)

    filter_horizontal = ("allowed_models",)
    # secret_hash is in no field list: the admin never shows it.
    fieldsets = (
        (None, {"fields": ("prefix", "user", "parent", "name", "expires_at", "allowed_models", "scopes")}),
        ("Limits of this key (on top of its owner's plan)", {"fields": ("budget_usd", "budget_period", "rpm", "tpm")}),
        (
            "History",
            {"fields": ("created_at", "last_used_at", "rotated_at", "previous_secret_expires_at", "revoked_at")},
        ),
    )
    readonly_fields = (
        "prefix",
        "user",
        "parent",
        "created_at",
        "last_used_at",
        "rotated_at",
        "previous_secret_expires_at",
        "revoked_at",
    )

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        if obj.revoked_at is not None:
            return "revoked"
        return "active" if obj.is_active else "expired"

    def get_form(self, request: HttpRequest, obj: ApiKey | None = None, **kwargs: Any) -> Any:
        if obj is None:
            kwargs.setdefault("form", self.add_form)
        return super().get_form(request, obj, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        if obj is None:
            return ((None, {"fields": self.add_form.Meta.fields}),)
        return self.fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return () if obj is None else self.readonly_fields

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.ModelForm, change: bool) -> None:
        if change:  # through the service, which records what changed (key.change)
            api_key_change(api_key=obj, allowed_models=form.cleaned_data["allowed_models"])
            return
        created = api_key_create(
            user=form.cleaned_data["user"],
            name=form.cleaned_data["name"],
            expires_at=form.cleaned_data["expires_at"],
            allowed_models=form.cleaned_data["allowed_models"],
            scopes=form.cleaned_data["scopes"],
            budget_usd=form.cleaned_data["budget_usd"],
            budget_period=form.cleaned_data["budget_period"],
            rpm=form.cleaned_data["rpm"],
            tpm=form.cleaned_data["tpm"],
        )
        # The admin goes on with ``obj`` (change log, redirect): make it the row the service created.
        obj.pk = created.api_key.pk
        obj.refresh_from_db()
        self.message_user(
            request,
            f"The new key is {created.secret} — copy it now: it is shown this once and cannot be recovered.",
            messages.SUCCESS,
        )

    def save_related(self, request: HttpRequest, form: forms.ModelForm, formsets: Any, change: bool) -> None:
        # The key services (api_key_create, api_key_change) have already set the allowed models; the admin
        # has no inlines.
        return

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = api_keys_revoke(api_key_ids=queryset.values_list("pk", flat=True))
        self.message_user(request, f"Revoked {revoked} key(s).", messages.SUCCESS)

    @admin.action(
        description="Rotate selected keys (new secrets; the old ones work for the default grace period)",
        permissions=["change"],
    )
    def rotate_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        rotated, skipped = api_keys_rotate(api_key_ids=queryset.values_list("pk", flat=True))
        for key, was in rotated:
            until = key.api_key.previous_secret_expires_at
            self.message_user(
                request,
                f"{key.api_key.name} (was {was}…): the new key is {key.secret} — copy it now, it is shown this once. "
                + (f"The old secret works until {until:%Y-%m-%d %H:%M} UTC." if until else "The old secret stopped."),
                messages.SUCCESS,
            )
        if skipped:
            names = ", ".join(key.prefix for key in skipped)
            self.message_user(request, f"Not rotated (revoked or expired): {names}.", messages.WARNING)

    # Deleting goes through the key service too, so that it is audited and both secrets are forgotten.
    def delete_model(self, request: HttpRequest, obj: ApiKey) -> None:
        api_key_delete(api_key=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        api_keys_delete(api_key_ids=queryset.values_list("pk", flat=True))


# USAGE LEDGER


def _plain(amount: Decimal) -> str:
    """An amount as the ledger holds it, written out: ``str`` of a Decimal of 10 places below a millionth (every
    part that costs nothing) is scientific (``0E-10``, ``1.500E-7``)."""
    return format(amount, "f")


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    """The ledger is the source of truth for spend: nobody edits or deletes it from the admin."""

    list_display = (
        "created_at",
        "user",
        "model_name",
        "operation",
        "endpoint",
        "stream",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "status",
        "error_type",
        "usage_estimated",
    )
    # The model and provider are offered from the catalog and filtered on their keys (indexed in the ledger):
    # the names' own filters read the distinct names of the whole ledger at every page view (docs/ledger.md,
    # "The admin at scale"). A row whose model or provider is gone since is found under "-" (empty). Dates by
    # the date filter's ranges (on the created_at index), not a date hierarchy, whose levels read the distinct
    # months of the whole ledger, or days of a month, at every view.
    list_filter = (
        ("created_at", admin.DateFieldListFilter),
        "status",
        "operation",
        "endpoint",
        ("model", admin.RelatedFieldListFilter),
        ("provider", admin.RelatedFieldListFilter),
        "stream",
        "usage_estimated",
    )
    list_select_related = ("user",)
    search_fields = ("request_id", "user__username", "user__email")  # see get_search_results
    search_help_text = "A request id, or a user's username or email, written out exactly (any case for a user)."
    ordering = ("-created_at",)
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    readonly_fields = ("cost_breakdown",)

    @admin.display(description="cost breakdown (current prices)")
    def cost_breakdown(self, obj: UsageRecord) -> SafeString | str:
        """The row keeps its total only; the parts are priced again, by the ledger's own function, from the
        row's tokens and the catalog's prices of today (the answering deployment's), which may differ from those
        of the request."""
        # The deployment that answered; a row from before deployments (or whose deployment is gone): its
        # model's first deployment.
        model = obj.deployment
        if model is None and obj.model is not None:
            model = obj.model.deployments.order_by("priority", "pk").first()
        if model is None:
            return "The model is no longer in the catalog: only the recorded cost is known."
        parts = cost_breakdown(
            model=model,
            prompt_tokens=obj.prompt_tokens,
            completion_tokens=obj.completion_tokens,
            cached_tokens=obj.cached_tokens,
            cache_write_tokens=obj.cache_write_tokens,
            cache_write_1h_tokens=obj.cache_write_1h_tokens,
            web_search_requests=obj.web_search_requests,
            service_tier=obj.service_tier,
        )
        cached_price = model.input_per_mtok if model.cached_input_per_mtok is None else model.cached_input_per_mtok
        one_hour = ""
        if parts.cache_write_1h_tokens:
            one_hour = format_html(
                " and {} to the 1-hour cache at ${}/M", parts.cache_write_1h_tokens, _plain(cache_write_1h_price(model))
            )
        searches = ""
        if parts.web_search_requests:
            searches = format_html(
                " · web search ${} ({} searches at ${}/1,000)",
                _plain(parts.web_search_cost),
                parts.web_search_requests,
                _plain(model.web_search_per_1k),
            )
        tier = ""
        if parts.service_tier:
            # The prices below are the standard ones; the tier's factor multiplied each token's.
            tier = format_html(" · every token price × {} ({} tier)", _plain(parts.price_factor), parts.service_tier)
        return format_html(
            "input ${} ({} tokens at ${}/M) · cached input ${} ({} tokens at ${}/M) · cache write ${} ({} tokens at "
            "${}/M{}) · output ${} ({} tokens at ${}/M){}{} = ${}.<br>Computed now from this row's tokens and the "
            "catalog's current prices, which may have changed since the request; the recorded cost, ${}, is what "
            "was charged.",
            _plain(parts.input_cost),
            parts.input_tokens - parts.cached_input_tokens - parts.cache_write_tokens,
            _plain(model.input_per_mtok),
            _plain(parts.cached_input_cost),
            parts.cached_input_tokens,
            _plain(cached_price),
            _plain(parts.cache_write_cost),
            parts.cache_write_tokens - parts.cache_write_1h_tokens,
            _plain(cache_write_price(model)),
            one_hour,
            _plain(parts.output_cost),
            parts.output_tokens,
            _plain(model.output_per_mtok),
            tier,
            searches,
            _plain(parts.total_cost),
            _plain(obj.cost),
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[UsageRecord], search_term: str
    ) -> tuple[QuerySet[UsageRecord], bool]:
        """Whole values through indexes: the request id in its unique index, a user in the users' table and then
        their rows in the (user, created_at) index. Django's search (``LIKE '%term%'`` on each field, the users
        joined) read the whole ledger three times a search (docs/ledger.md, "The admin at scale")."""
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(request_id=term) | Q(user_id__in=user_ids_named(term))), False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False
