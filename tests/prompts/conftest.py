"""The admin tests drive the admin as the audit tests do: a superuser ``root`` and a client signed in as it."""

from __future__ import annotations

from tests.audit.conftest import admin_client, root  # noqa: F401  (fixtures)
