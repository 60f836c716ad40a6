"""The audit log's API, mounted at /api/audit/ (see ``audit.apis``)."""

from __future__ import annotations

from django.urls import path

from . import apis

urlpatterns = [
    path("", apis.AuditEventListApi.as_view(), name="audit-events"),
    path("export.csv", apis.AuditEventExportApi.as_view(), name="audit-events-export"),
]
