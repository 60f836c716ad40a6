"""Signals accounts sends for the apps above it, which it cannot import (tests/core/test_import_direction.py)."""

from __future__ import annotations

from django.dispatch import Signal

# Sent with ``user_ids`` (a batch), in the delete's transaction, before those users are deleted (``users_delete``):
# an app whose rows the delete takes with them (a cascade) records them as their own delete would (providers: each
# user's own provider key, ``provider_key.delete``).
users_deleting = Signal()
