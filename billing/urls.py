"""The management API, mounted at /api/ (see ``billing.apis``)."""

from __future__ import annotations

from django.urls import path

from . import apis, apis_rotation

urlpatterns = [
    path("keys/", apis.ApiKeyListCreateApi.as_view(), name="api-keys"),
    path("keys/<int:key_id>/", apis.ApiKeyDetailApi.as_view(), name="api-key-detail"),
    path("keys/<int:key_id>/revoke/", apis.ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
    path("keys/<int:key_id>/rotate/", apis_rotation.ApiKeyRotateApi.as_view(), name="api-key-rotate"),
    path("usage/", apis.UsageListApi.as_view(), name="usage"),
    path("usage/summary/", apis.UsageSummaryApi.as_view(), name="usage-summary"),
    path("cost/estimate", apis.CostEstimateApi.as_view(), name="cost-estimate"),
]
