"""The Celery application: health checks, key rotation, reservation reconciliation and cost rollups."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.base")

app = Celery("llmhub")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
