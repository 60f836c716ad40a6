"""Admin for deployments: where each public model is served, how its circuit breaker stands, and what its
latest health checks found. The breaker actions call ``deployment_breaker_override_set``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.db.models import OuterRef, QuerySet, Subquery
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

from core.admin_delete import BoundedDeleteConfirmation

from .adapters import every_request_search_refusal
from .models import BreakerOverride, Deployment, EveryRequestSearch, HealthCheck
from .routing.breaker_machine import CLOSED, HALF_OPEN, OPEN, BreakerState
from .routing.breakers import breaker_state, breaker_states
from .services.breakers import deployment_breaker_override_set, deployment_upstream_changed

HEALTH_CHECKS_SHOWN = 20
# A state's colour, as a class of providers/static/providers/admin_breakers.css (the Content-Security-Policy
# allows no style attribute, core/csp.py).
_COLOURS = {CLOSED: "breaker-closed", HALF_OPEN: "breaker-half-open", OPEN: "breaker-open"}


class _LatestHealthChecks(BaseInlineFormSet):
    """Only the latest checks of the deployment: slicing must come after the inline's filter on it."""

    def get_queryset(self) -> QuerySet[HealthCheck]:
        if not hasattr(self, "_latest"):
            self._latest = super().get_queryset().order_by("-checked_at")[:HEALTH_CHECKS_SHOWN]
        return self._latest


class HealthCheckInline(admin.TabularInline):
    model = HealthCheck
    formset = _LatestHealthChecks
    fields = ("checked_at", "ok", "latency_ms", "paid", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = f"latest health checks (at most {HEALTH_CHECKS_SHOWN})"

    def has_add_permission(self, request: HttpRequest, obj: Deployment | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Deployment | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Deployment | None = None) -> bool:
        return False


class DeploymentForm(forms.ModelForm):
    """A deployment's settings checked against its provider's kind, on its page and in its model's inline
    (``DeploymentInlineForm``). No Meta: the admin builds the form for its fields."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        provider = cleaned.get("provider")
        if provider is not None and cleaned.get("searches_every_request") == EveryRequestSearch.ALWAYS:
            refusal = every_request_search_refusal(provider.kind)
            if refusal:
                self.add_error("searches_every_request", refusal[:1].upper() + refusal[1:])
        return cleaned


def _breaker_html(state: BreakerState, override: str) -> SafeString:
    if override:
        return format_html(
            '<strong class="{}">forced {}</strong> <span title="the breaker underneath">({})</span>',
            _COLOURS[override],
            override,
            state.state.replace("_", "-"),
        )
    if state.state == OPEN:
        detail = f"lets a probe through in {state.seconds_to_probe(timezone.now()):.0f} s"
    elif state.state == HALF_OPEN:
        detail = "probe out" if state.probe_until else "waiting for a probe"
    else:
        detail = f"{state.failures} failure{'s' if state.failures != 1 else ''} in a row" if state.failures else ""
    if state.window_calls:
        detail = f"{detail}; " if detail else ""
        detail += f"{state.window_failures}/{state.window_calls} failed lately"
    return format_html(
        '<strong class="{}">{}</strong>{}{}',
        _COLOURS[state.state],
        state.state.replace("_", "-"),
        " · " if detail else "",
        detail,
    )


def _when(moment: datetime) -> str:
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M %Z} ({timesince(moment)} ago)"


@admin.register(Deployment)
class DeploymentAdmin(BoundedDeleteConfirmation, admin.ModelAdmin):
    form = DeploymentForm
    list_display = (
        "__str__",
        "model",
        "provider",
        "upstream",
        "prices",
        "weight",
        "priority",
        "enabled",
        "breaker",
        "last_health_check",
    )
    list_filter = ("enabled", "breaker_override", "provider")
    list_select_related = ("model", "provider")
    search_fields = ("name", "upstream_id", "model__name", "provider__name")
    actions = ("force_breaker_open", "force_breaker_closed", "clear_breaker_override")
    inlines = (HealthCheckInline,)

    class Media:
        css = {"all": ("providers/admin_breakers.css",)}

    readonly_fields = ("upstream_model_missing", "breaker_now", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("model", "name", "provider", "upstream_id", "upstream_model_missing", "enabled")}),
        (
            "Prices ($ per million tokens; web searches per 1,000; OpenAI's priority and flex tiers as factors)",
            {
                "fields": (
                    "input_per_mtok",
                    "output_per_mtok",
                    "cached_input_per_mtok",
                    "cache_write_per_mtok",
                    "cache_write_1h_per_mtok",
                    "web_search_per_1k",
                    "searches_every_request",
                    "priority_price_factor",
                    "flex_price_factor",
                )
            },
        ),
        ("Routing", {"fields": ("weight", "priority", "rpm_limit", "tpm_limit", "quality")}),
        ("Circuit breaker", {"fields": ("breaker_now", "breaker_override", "paid_health_probe")}),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )

    def save_model(self, request: HttpRequest, obj: Deployment, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        previous = form.initial.get("upstream_id", obj.upstream_id)
        deployment_upstream_changed(deployment=obj, previous_upstream_id=previous)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Deployment]:
        latest = HealthCheck.objects.filter(deployment=OuterRef("pk")).order_by("-checked_at")
        return (
            super()
            .get_queryset(request)
            .annotate(
                last_check_at=Subquery(latest.values("checked_at")[:1]),
                last_check_ok=Subquery(latest.values("ok")[:1]),
                last_check_latency_ms=Subquery(latest.values("latency_ms")[:1]),
            )
        )

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        """The page's breakers in one read (one Redis round trip), not one per row."""
        changelist = super().get_changelist_instance(request)
        states = breaker_states(deployment.pk for deployment in changelist.result_list)
        for deployment in changelist.result_list:
            deployment.breaker_state = states[deployment.pk]
        return changelist

    @admin.display(description="upstream id", ordering="upstream_id")
    def upstream(self, obj: Deployment) -> SafeString:
        missing = obj.upstream_model_missing
        if missing is None:
            return format_html("{}", obj.upstream_id)
        return format_html(
            '{}<br><strong class="{}">upstream model missing since {}</strong>',
            obj.upstream_id,
            _COLOURS[OPEN],
            _when(missing),
        )

    @admin.display(description="at the provider")
    def upstream_model_missing(self, obj: Deployment) -> SafeString | str:
        """What the health round found of the upstream id: a missing one is a catalog mistake that refuses every
        request (users' own keys included), fixed by correcting the upstream id."""
        if obj.upstream_model_missing is None:
            return "listed at the last health check (or not checked)"
        return format_html(
            '<strong class="{}">upstream model missing since {}</strong>: the provider\'s model list does not name '
            "this upstream id; correct it (the next health check clears this).",
            _COLOURS[OPEN],
            _when(obj.upstream_model_missing),
        )

    @admin.display(description="prices in / out ($/Mtok)")
    def prices(self, obj: Deployment) -> str:
        return f"{obj.input_per_mtok.normalize():f} / {obj.output_per_mtok.normalize():f}"

    @admin.display(description="breaker")
    def breaker(self, obj: Deployment) -> SafeString:
        state = getattr(obj, "breaker_state", None) or breaker_state(obj.pk)
        return _breaker_html(state, obj.breaker_override)

    @admin.display(description="breaker now")
    def breaker_now(self, obj: Deployment) -> SafeString | str:
        return _breaker_html(breaker_state(obj.pk), obj.breaker_override) if obj.pk else "—"

    @admin.display(description="last health check", ordering="last_check_at")
    def last_health_check(self, obj: Deployment) -> SafeString | str:
        if obj.last_check_at is None:
            return "never checked"
        latency = "" if obj.last_check_latency_ms is None else f", {obj.last_check_latency_ms} ms"
        return format_html(
            '<span class="{}">{}</span>{}, {} ago',
            _COLOURS[CLOSED if obj.last_check_ok else OPEN],
            "ok" if obj.last_check_ok else "failing",
            latency,
            timesince(obj.last_check_at),
        )

    def _override(self, request: HttpRequest, queryset: QuerySet[Deployment], override: str, done: str) -> None:
        deployments = list(queryset)
        for deployment in deployments:
            deployment_breaker_override_set(deployment=deployment, override=override)
        names = ", ".join(str(deployment) for deployment in deployments)
        self.message_user(request, f"{done}: {names}.", messages.SUCCESS)

    @admin.action(description="Force breaker open (no traffic)", permissions=["change"])
    def force_breaker_open(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        self._override(request, queryset, BreakerOverride.OPEN, "Breaker forced open")

    @admin.action(description="Force breaker closed (always a candidate)", permissions=["change"])
    def force_breaker_closed(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        self._override(request, queryset, BreakerOverride.CLOSED, "Breaker forced closed")

    @admin.action(description="Clear override and reset breaker", permissions=["change"])
    def clear_breaker_override(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        self._override(request, queryset, BreakerOverride.NONE, "Override cleared and breaker reset")
