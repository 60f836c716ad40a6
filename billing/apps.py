from __future__ import annotations

from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing: keys, plans, budgets and usage"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (cache invalidation on key changes)
