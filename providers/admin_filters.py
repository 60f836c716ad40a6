"""List filters for the tables that copy a model's public name (or a provider's) into a column of their own (chat
messages, the daily usage rollup): the choices come from the catalog. Django's filter on such a column
lists its distinct values by reading every row of the table at every view of the list (docs/ledger.md, "The
admin at scale"); a name since gone from the catalog is still a filter in the address (``?model_name=…``)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import CatalogModel, Provider


class CatalogModelNameFilter(admin.SimpleListFilter):
    title = "model"
    parameter_name = "model_name"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(name, name) for name in CatalogModel.objects.order_by("name").values_list("name", flat=True)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(model_name=self.value()) if self.value() else queryset


class ProviderNameFilter(admin.SimpleListFilter):
    title = "provider"
    parameter_name = "provider_name"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(name, name) for name in Provider.objects.order_by("name").values_list("name", flat=True)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(provider_name=self.value()) if self.value() else queryset
