"""The operations dashboard, mounted at /ops/."""

from __future__ import annotations

from django.urls import path

from . import views_ops

urlpatterns = [
    path("", views_ops.ops_page, name="ops"),
    path("data.json", views_ops.ops_data, name="ops-data"),
]
