from __future__ import annotations

from django.apps import AppConfig


class PromptsConfig(AppConfig):
    name = "prompts"
    verbose_name = "Prompts: templates, versions and brand profiles"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (cache invalidation on saves)
