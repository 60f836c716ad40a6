from __future__ import annotations

from django.apps import AppConfig


class ExperimentsConfig(AppConfig):
    name = "experiments"
    verbose_name = "Experiments: A/B tests and feedback"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (assignment cache invalidation on experiment changes)
