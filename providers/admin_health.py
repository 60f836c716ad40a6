"""Admin for incidents: which deployments went down, when, for how long and why. Read-only: incidents are
opened and closed by the health checks (``providers.services.incidents``)."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import F, QuerySet
from django.http import HttpRequest

from core.admin_dates import DateHierarchyBounded
from core.outbox import deliveries_send_again, send_again_report

from .models import Incident
from .services.incidents import incident_deliveries, incident_duration, incident_events, incident_names


class IncidentStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("open", "Open"), ("closed", "Closed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Incident]) -> QuerySet[Incident]:
        if self.value() == "open":
            return queryset.filter(ended_at__isnull=True)
        if self.value() == "closed":
            return queryset.filter(ended_at__isnull=False)
        return queryset


@admin.register(Incident)
class IncidentAdmin(DateHierarchyBounded, admin.ModelAdmin):
    list_display = ("deployment_name", "model_name", "provider_name", "started_at", "ended_at", "duration", "reason")
    list_select_related = ("deployment__model", "deployment__provider")
    list_filter = (IncidentStateFilter, "deployment__model__name", "deployment__provider__name")
    # Open incidents first (no end), then the most recent.
    ordering = (F("ended_at").desc(nulls_first=True), "-started_at")
    date_hierarchy = "started_at"
    search_fields = ("deployment__name", "deployment__model__name", "deployment__provider__name", "reason")
    fields = (
        "deployment",
        "kept_deployment",
        "kept_model",
        "kept_provider",
        "kept_upstream_id",
        "started_at",
        "ended_at",
        "duration",
        "reason",
        "ended_because",
        "delivered",
        "delivery",
    )
    readonly_fields = fields
    actions = ("send_again",)

    @admin.action(description="Send their undelivered email and webhook again")
    def send_again(self, request: HttpRequest, queryset: QuerySet[Incident]) -> None:
        """For a delivery whose retries ran out, or older than the alert sweep's cut-off: queued now, afresh."""
        deliveries = (d for incident in queryset for d in incident_deliveries(incident, incident_events(incident)))
        self.message_user(request, *send_again_report(*deliveries_send_again(deliveries)))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Incident]:
        # The provider's name is all this page shows of it: its secrets are not even decrypted.
        return (
            super()
            .get_queryset(request)
            .select_related("deployment__model", "deployment__provider")
            .defer("deployment__provider__api_key", "deployment__provider__extra_headers")
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Incident | None = None) -> bool:
        return False

    # A deleted deployment's incidents show the names they kept, the deployment's marked deleted.
    @admin.display(description="deployment", ordering="deployment__name")
    def deployment_name(self, obj: Incident) -> str:
        name = incident_names(obj).deployment
        return name if obj.deployment is not None else f"{name} (deleted)"

    @admin.display(description="model", ordering="deployment__model__name")
    def model_name(self, obj: Incident) -> str:
        return incident_names(obj).model

    @admin.display(description="provider", ordering="deployment__provider__name")
    def provider_name(self, obj: Incident) -> str:
        return incident_names(obj).provider

    @admin.display(description="duration")
    def duration(self, obj: Incident) -> str:
        text = incident_duration(obj)
        return text if obj.ended_at else f"{text} (ongoing)"
