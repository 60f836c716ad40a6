"""Admin for providers and the model catalog. Actions call services; the API key is write-only."""

from __future__ import annotations

import logging
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.timesince import timesince

from .exceptions import ApplicationError
from .fields import Secret
from .models import CatalogModel, Deployment, HealthStatus, Provider
from .services.health import providers_health_check
from .services.model_import import provider_import_models
from .types import HealthResult

logger = logging.getLogger(__name__)


def _failure_text(exc: Exception) -> str:
    """What an admin may read about an exception: our own messages are written to be shown; for anything
    else only its type, since its text may carry what a provider sent back (the traceback is logged)."""
    if isinstance(exc, ApplicationError):
        return exc.message
    if isinstance(exc, ImproperlyConfigured):
        return str(exc)
    return f"unexpected {type(exc).__name__}; see the server log"


class ProviderAdminForm(forms.ModelForm):
    """No Meta: ``ProviderAdmin`` builds the form for its fieldsets (with its ``formfield_overrides``)."""

    clear_api_key = forms.BooleanField(required=False, label="Clear stored key", help_text="Remove the stored API key.")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("clear_api_key"):
            if cleaned.get("api_key"):
                self.add_error("api_key", "Give a new key or tick “Clear stored key”, not both.")
            else:
                # An empty Secret, not None: None is the key field's "keep what is stored".
                cleaned["api_key"] = Secret("")
        return cleaned


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderAdminForm
    # What an admin types without a scheme is an API host: https (Django 6's default, set before it).
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    list_display = ("name", "kind", "effective_base_url", "enabled", "last_health", "models_count")
    list_filter = ("kind", "enabled", "last_health_status")
    search_fields = ("name", "base_url")
    actions = ("test_connection", "import_models")
    readonly_fields = ("last_health_status", "last_health_latency_ms", "last_health_error", "last_health_at")
    fieldsets = (
        (None, {"fields": ("name", "kind", "enabled")}),
        (
            "Endpoint",
            {"fields": ("base_url", "api_key", "clear_api_key", "organization", "api_version", "extra_headers")},
        ),
        ("Client", {"fields": ("timeout_seconds",)}),
        ("Last health check", {"fields": readonly_fields}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Provider]:
        return super().get_queryset(request).annotate(models_total=Count("deployments__model", distinct=True))

    @admin.display(description="base URL")
    def effective_base_url(self, obj: Provider) -> str:
        return obj.effective_base_url

    @admin.display(description="models", ordering="models_total")
    def models_count(self, obj: Provider) -> int:
        return obj.models_total

    @admin.display(description="last health", ordering="last_health_at")
    def last_health(self, obj: Provider) -> str:
        if obj.last_health_at is None:
            return "never checked"
        latency = "" if obj.last_health_latency_ms is None else f", {obj.last_health_latency_ms} ms"
        return format_html(
            '<span title="{}">{}{}, {} ago</span>',
            obj.last_health_error,
            HealthStatus(obj.last_health_status).label,
            latency,
            timesince(obj.last_health_at),
        )

    @admin.action(description="Test connection")
    def test_connection(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        providers = list(queryset)
        for provider, outcome in zip(providers, providers_health_check(providers=providers), strict=True):
            if isinstance(outcome, HealthResult) and outcome.ok:
                seen = "" if outcome.models_seen is None else f", {outcome.models_seen} models listed"
                self.message_user(request, f"{provider}: OK in {outcome.latency_ms} ms{seen}.", messages.SUCCESS)
            elif isinstance(outcome, HealthResult):
                self.message_user(
                    request, f"{provider}: failed after {outcome.latency_ms} ms: {outcome.error}", messages.ERROR
                )
            else:
                logger.error("health check of provider %s could not run", provider.name, exc_info=outcome)
                self.message_user(request, f"{provider}: check could not run: {_failure_text(outcome)}", messages.ERROR)

    @admin.action(description="Import models")
    def import_models(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        for provider in queryset:
            try:
                result = provider_import_models(provider=provider)
            except Exception as exc:
                if not isinstance(exc, ApplicationError | ImproperlyConfigured):
                    logger.exception("model import from provider %s failed", provider.name)
                self.message_user(request, f"{provider}: import failed: {_failure_text(exc)}", messages.ERROR)
                continue
            text = f"{provider}: {len(result.created)} model(s) added"
            if result.created:
                text += f" (disabled until priced: {', '.join(result.created)})"
            text += f"; {result.already_known} already in the catalog."
            if result.skipped:
                text += f" No free public name for: {', '.join(result.skipped)}."
            self.message_user(request, text, messages.SUCCESS if not result.skipped else messages.WARNING)


class DeploymentInline(admin.TabularInline):
    model = Deployment
    extra = 0
    fields = (
        "name",
        "provider",
        "upstream_id",
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "weight",
        "priority",
        "rpm_limit",
        "tpm_limit",
        "quality",
        "breaker_override",
        "enabled",
    )


@admin.register(CatalogModel)
class CatalogModelAdmin(admin.ModelAdmin):
    inlines = (DeploymentInline,)
    list_display = ("name", "alias_of", "mode", "strategy", "context_window", "enabled")
    list_editable = ("enabled",)
    list_filter = (
        "mode",
        "strategy",
        "enabled",
        "supports_streaming",
        "supports_tools",
        "supports_vision",
        "supports_json_mode",
    )
    list_select_related = ("alias_of",)
    search_fields = ("name", "label", "deployments__upstream_id")
    readonly_fields = ("created_at", "updated_at")
    fieldsets = (
        ("Identity", {"fields": ("name", "label", "alias_of", "mode", "enabled")}),
        (
            "Routing",
            {
                "fields": (
                    "strategy",
                    "retries",
                    "fallbacks",
                    "context_window_fallbacks",
                    "resume_on_failure",
                    "stream_idle_timeout_seconds",
                )
            },
        ),
        ("Limits", {"fields": ("context_window", "max_output_tokens")}),
        (
            "Capabilities",
            {"fields": ("supports_streaming", "supports_tools", "supports_vision", "supports_json_mode")},
        ),
        ("Parameter rules", {"fields": ("parameter_rules",)}),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )


from . import admin_health  # noqa: E402, F401  (registers IncidentAdmin)
