"""Admin of the operations alerts: rules (thresholds, windows, recipients) editable, incidents read-only."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest

from core.admin_dates import DateHierarchyBounded
from core.outbox import deliveries_send_again, send_again_report
from providers.fields import Secret
from providers.models import CatalogModel

from .models import OpsAlertIncident, OpsAlertRule
from .services.alert_sweep import ops_incident_deliveries, ops_incident_events
from .services.ops_alerts import ops_rule_incidents_close, ops_rules_delete

# A rule narrowed to a name no model of the catalog has (its model deleted, or given so in the shell).
NOT_IN_CATALOG = "{} (no model of the catalog is named so now)"


def rule_watches(rule: OpsAlertRule) -> str:
    """The model the rule watches by its name now; one named by a name no model has any more said so."""
    name = rule.watched_model_name
    if not name:
        return "-"
    return name if rule.model_id is not None else NOT_IN_CATALOG.format(name)


class OpsAlertRuleForm(forms.ModelForm):
    """The webhook's URL is its credential: shown as its host only, kept when left empty, removed only when
    asked (an empty field cannot say "remove" when it also says "keep").

    The model is chosen among the catalog's by its name now, and the rule is bound to it (``OpsAlertRule.model``):
    renamed later, the rule follows it. A name no model has any more (its model deleted) is offered as it is,
    said so, and kept until another is chosen."""

    webhook_url_remove = forms.BooleanField(
        required=False, label="Remove the webhook", help_text="Alerts then go to LLMHUB_ALERT_WEBHOOK_URL, if set."
    )

    class Meta:
        model = OpsAlertRule
        fields = [
            "name",
            "kind",
            "enabled",
            "threshold",
            "window_minutes",
            "minimum_requests",
            "minimum_baseline_usd",
            "clear_after_minutes",
            "model_name",
            "email_recipients",
            "webhook_url",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = list(CatalogModel.objects.order_by("name").values_list("name", flat=True))
        current = self.instance.watched_model_name
        choices = [("", "Every model (all spend)"), *((name, name) for name in names)]
        if current and current not in names:
            choices.append((current, NOT_IN_CATALOG.format(current)))
        self.fields["model_name"] = forms.ChoiceField(
            choices=choices,
            required=False,
            label="Model",
            help_text="Only this public model (error rate, latency, spend), followed if it is renamed; empty: all.",
        )
        self.initial["model_name"] = current

    def clean_webhook_url(self) -> Secret | None:
        typed = self.cleaned_data.get("webhook_url")
        # Typed without a scheme, a webhook is an https one (Django 6's URLField default, as the providers').
        if typed and "://" not in typed.reveal():
            return Secret("https://" + typed.reveal())
        return typed

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        name = cleaned.get("model_name") or ""
        self.instance.model = CatalogModel.objects.filter(name=name).first() if name else None
        if cleaned.get("webhook_url_remove"):
            if cleaned.get("webhook_url"):
                self.add_error("webhook_url_remove", "Either type a new webhook or remove it, not both.")
            else:
                cleaned["webhook_url"] = Secret("")
        return cleaned


@admin.register(OpsAlertRule)
class OpsAlertRuleAdmin(admin.ModelAdmin):
    form = OpsAlertRuleForm
    list_display = [
        "name",
        "kind",
        "enabled",
        "threshold",
        "window_minutes",
        "minimum_requests",
        "watches",
        "open",
        "webhook",
    ]
    list_editable = ["enabled", "threshold", "window_minutes", "minimum_requests"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "model_name"]
    fieldsets = [
        (None, {"fields": ["name", "kind", "enabled"]}),
        ("When it fires", {"fields": ["threshold", "window_minutes", "minimum_requests", "minimum_baseline_usd"]}),
        ("When it clears", {"fields": ["clear_after_minutes"]}),
        ("What it watches", {"fields": ["model_name"]}),
        (
            "Who is told",
            {
                "fields": ["email_recipients", "webhook_url", "webhook_url_remove"],
                "description": "Empty: ADMINS (or the superusers) and LLMHUB_ALERT_WEBHOOK_URL. A webhook is "
                "called under the outbound policy of provider calls.",
            },
        ),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: OpsAlertRule | None = None) -> list[str]:
        # The kind is what the rule's incidents mean: changed under an open one, it would be judged (and cleared,
        # "at worst 60 ms") as another kind. Another kind is another rule.
        return [*super().get_readonly_fields(request, obj), *(["kind"] if obj is not None else [])]

    def save_model(self, request: HttpRequest, obj: OpsAlertRule, form: forms.ModelForm, change: bool) -> None:
        # The change form and the list's editable column alike: a disabled rule is evaluated no more, so its open
        # incidents are closed now, and told as such, rather than left as pages that never resolve.
        super().save_model(request, obj, form, change)
        if change and "enabled" in form.changed_data and not obj.enabled:
            ops_rule_incidents_close(rule=obj, because=f"the rule was disabled by {request.user.get_username()}")

    # The delete page and the bulk action alike: the open incidents are closed and told, not deleted silently.
    def delete_model(self, request: HttpRequest, obj: OpsAlertRule) -> None:
        ops_rules_delete(rules=[obj], by=request.user.get_username())

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[OpsAlertRule]) -> None:
        ops_rules_delete(rules=list(queryset), by=request.user.get_username())

    def get_queryset(self, request: HttpRequest) -> QuerySet[OpsAlertRule]:
        return (
            super()
            .get_queryset(request)
            .select_related("model")
            .annotate(open_count=Count("incidents", filter=Q(incidents__cleared_at__isnull=True)))
        )

    @admin.display(description="open incidents", ordering="open_count")
    def open(self, rule: OpsAlertRule) -> int:
        return rule.open_count

    @admin.display(description="model", ordering="model_name")
    def watches(self, rule: OpsAlertRule) -> str:
        return rule_watches(rule)

    @admin.display(description="webhook")
    def webhook(self, rule: OpsAlertRule) -> str:
        # Its host only (the hint); one no key decrypts says so, its alerts going by email only.
        return str(rule.webhook_url) if rule.webhook_url else "-"


class OpenFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("open", "Open"), ("cleared", "Cleared")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[OpsAlertIncident]) -> QuerySet[OpsAlertIncident]:
        if self.value() == "open":
            return queryset.filter(cleared_at__isnull=True)
        if self.value() == "cleared":
            return queryset.filter(cleared_at__isnull=False)
        return queryset


@admin.register(OpsAlertIncident)
class OpsAlertIncidentAdmin(DateHierarchyBounded, admin.ModelAdmin):
    """Opened and cleared by the evaluator only: an admin reads them (and may delete old ones)."""

    list_display = ["rule", "subject", "opened_at", "cleared_at", "value_at_open", "peak", "delivered", "delivery"]
    list_filter = [OpenFilter, "rule__kind", "rule"]
    search_fields = ["subject", "detail"]
    list_select_related = ["rule"]
    date_hierarchy = "opened_at"
    readonly_fields = [field.name for field in OpsAlertIncident._meta.fields]
    actions = ["send_again"]

    @admin.action(description="Send their undelivered email and webhook again")
    def send_again(self, request: HttpRequest, queryset: QuerySet[OpsAlertIncident]) -> None:
        """For a delivery whose retries ran out, or older than the sweep's cut-off: queued now, afresh."""
        deliveries = (
            delivery
            for incident in queryset.select_related("rule")
            for delivery in ops_incident_deliveries(incident, ops_incident_events(incident))
        )
        self.message_user(request, *send_again_report(*deliveries_send_again(deliveries)))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: OpsAlertIncident | None = None) -> bool:
        return False
