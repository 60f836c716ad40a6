from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.provider_keys_page, name="provider-keys"),
]
