"""The audit log in the admin: read-only for everyone (superusers too), filterable, exportable as CSV."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.urls import path
from django.utils.html import format_html

from core.paginators import EstimatedCountPaginator

from .exports import audit_csv_response
from .models import AuditEvent
from .selectors import audit_search_q


class IndexedValuesFilter(admin.SimpleListFilter):
    """The distinct values of an indexed column as the choices, read by hopping along its index (a loose index
    scan: one probe per value, ``MIN(column) WHERE column > previous``), not ``SELECT DISTINCT`` over every row
    of the log at every view of the list (docs/ledger.md, "The admin at scale"). The empty value is left out."""

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        connection = connections[model_admin.get_queryset(request).db]
        column = connection.ops.quote_name(self.parameter_name)
        table = connection.ops.quote_name(model_admin.model._meta.db_table)
        # Names from the code (the filter's and the model's), quoted; no value of the request goes in.
        hops = (
            f"WITH RECURSIVE seen(value) AS (SELECT MIN({column}) FROM {table} UNION ALL "  # noqa: S608
            f"SELECT (SELECT MIN({column}) FROM {table} WHERE {column} > seen.value) FROM seen "
            "WHERE seen.value IS NOT NULL) SELECT value FROM seen WHERE value IS NOT NULL AND value <> ''"
        )
        with connection.cursor() as cursor:
            cursor.execute(hops)
            return [(value, value) for (value,) in cursor.fetchall()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(**{self.parameter_name: self.value()}) if self.value() else queryset


class ActionFilter(IndexedValuesFilter):
    title = "action"
    parameter_name = "action"  # indexed on its own


class TargetTypeFilter(IndexedValuesFilter):
    title = "target type"
    parameter_name = "target_type"  # the first column of the (target_type, target_id) index


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Append-only: no add, change or delete here, whatever the user's permissions; the change page shows a
    row read-only. ``manage.py auditverify`` says whether a row was changed in the database behind the admin."""

    list_display = ("seq", "created_at", "actor", "action", "target", "ip_address")
    list_display_links = ("seq", "created_at")
    # Dates by the date filter's ranges: a date hierarchy reads the distinct months of the whole log, or the days
    # of a month, at every view.
    list_filter = (ActionFilter, "actor_type", TargetTypeFilter, "created_at")
    search_fields = ("action", "actor_repr", "target_id", "target_repr", "ip_address")  # see get_search_results
    search_help_text = (
        "An actor (a username, a key prefix, system, or type:id such as user:42), an action, a target's id or "
        "name, or an IP address, written out exactly."
    )
    ordering = ("-seq",)
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    actions = ("export_csv",)
    fields = (
        "seq",
        "created_at",
        "actor_type",
        "actor_id",
        "actor_repr",
        "action",
        "target_type",
        "target_id",
        "target_repr",
        "changes_pretty",
        "ip_address",
        "user_agent",
        "prev_hash",
        "hash",
    )
    readonly_fields = fields
    change_list_template = "admin/audit/auditevent/change_list.html"

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[AuditEvent], search_term: str
    ) -> tuple[QuerySet[AuditEvent], bool]:
        term = search_term.strip()
        return (queryset.filter(audit_search_q(term)) if term else queryset), False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    @admin.display(description="actor", ordering="actor_repr")
    def actor(self, event: AuditEvent) -> str:
        return f"{event.get_actor_type_display()}: {event.actor_repr}" if event.actor_repr else event.actor_type

    @admin.display(description="target", ordering="target_type")
    def target(self, event: AuditEvent) -> str:
        if not event.target_type:
            return ""
        return f"{event.target_type} #{event.target_id} {event.target_repr}".strip()

    @admin.display(description="changes")
    def changes_pretty(self, event: AuditEvent) -> str:
        return format_html("<pre>{}</pre>", json.dumps(event.changes, indent=2, sort_keys=True, ensure_ascii=False))

    @admin.action(description="Export the selected events as CSV")
    def export_csv(self, request: HttpRequest, queryset: QuerySet[AuditEvent]) -> HttpResponse:
        return audit_csv_response(queryset.order_by("-seq"))

    def get_urls(self) -> list[Any]:
        export = path(
            "export.csv",
            self.admin_site.admin_view(self.export_view),
            name="audit_auditevent_export",
        )
        return [export, *super().get_urls()]

    def export_view(self, request: HttpRequest) -> HttpResponse:
        """Every event the change list shows with the same filters and search (no selection needed)."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            return HttpResponseBadRequest("Unknown filter in the query string.")
        return audit_csv_response(changelist.get_queryset(request).order_by("-seq"))
