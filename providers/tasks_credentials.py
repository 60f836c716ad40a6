"""Celery tasks for users' own provider keys (bring your own key)."""

from __future__ import annotations
