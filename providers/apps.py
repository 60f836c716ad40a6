from __future__ import annotations

from django.apps import AppConfig


class ProvidersConfig(AppConfig):
    name = "providers"
    verbose_name = "Providers and model catalog"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (cache invalidation on admin saves)
