"""The usage pages, mounted at /usage/."""

from __future__ import annotations

from django.urls import path

from . import views_dashboard

urlpatterns = [
    path("", views_dashboard.usage_page, name="usage"),
    path("admin/", views_dashboard.usage_admin_page, name="usage-admin"),
]
