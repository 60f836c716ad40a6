from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor


class AddColumnInPlace(migrations.AddField):
    """``AddField`` as one ``ALTER TABLE ... ADD COLUMN`` on every database. Django copies the whole table on
    SQLite to add a column with a default; SQLite adds a column with a constant default to its schema alone,
    as PostgreSQL (11 and later) does, so the rollup's table of thousands of rows a day is not rewritten."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "sqlite":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        model = to_state.apps.get_model(app_label, self.model_name)
        if self.allow_migrate_model(schema_editor.connection.alias, model):
            BaseDatabaseSchemaEditor.add_field(schema_editor, model, model._meta.get_field(self.name))


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0028_errrate_invalid_status"),
    ]

    operations = [
        AddColumnInPlace(
            model_name="dailyusage",
            name="cache_write_tokens",
            field=models.PositiveBigIntegerField(
                db_default=0,
                default=0,
                help_text="Prompt tokens written to the provider's prompt cache (part of prompt).",
            ),
        ),
    ]
