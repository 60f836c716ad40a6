"""Migration operations that Django's own do more slowly than they need to."""

from __future__ import annotations

from typing import Any

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor


class AddColumnInPlace(migrations.AddField):
    """``AddField`` as one ``ALTER TABLE ... ADD COLUMN`` on every database. Django copies the whole table on
    SQLite to add a column with a default; SQLite adds a column with a constant default to its schema alone,
    as PostgreSQL (11 and later) does, so a table of millions of rows (the ledger, its rollup) is not
    rewritten."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor != "sqlite":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
            return
        model = to_state.apps.get_model(app_label, self.model_name)
        if self.allow_migrate_model(schema_editor.connection.alias, model):
            BaseDatabaseSchemaEditor.add_field(schema_editor, model, model._meta.get_field(self.name))
