"""Users' own provider keys over REST, mounted at /api/provider-keys/ (see ``providers.apis_credentials``)."""

from __future__ import annotations

from django.urls import path

from . import apis_credentials as apis

urlpatterns = [
    path("", apis.ProviderCredentialListCreateApi.as_view(), name="api-provider-keys"),
    path("providers/", apis.ProviderAcceptingKeysListApi.as_view(), name="api-provider-keys-providers"),
    path("<int:credential_id>/", apis.ProviderCredentialDetailApi.as_view(), name="api-provider-key-detail"),
    path(
        "<int:credential_id>/validate/", apis.ProviderCredentialValidateApi.as_view(), name="api-provider-key-validate"
    ),
    path(
        "<int:credential_id>/confirm-host/",
        apis.ProviderCredentialHostConfirmApi.as_view(),
        name="api-provider-key-confirm-host",
    ),
]
