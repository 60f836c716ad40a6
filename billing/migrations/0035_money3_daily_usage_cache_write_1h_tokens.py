from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor


class AddColumnInPlace(migrations.AddField):
    """``AddField`` as one ``ALTER TABLE ... ADD COLUMN`` on every database (as in 0029): Django copies the whole
    table on SQLite to add a column with a default; SQLite adds a column with a constant default to its schema
    alone, as PostgreSQL (11 and later) does, so the rollup's table of thousands of rows a day is not rewritten,
    and the previous release's rollup, which names its columns without this one, still inserts."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "sqlite":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        model = to_state.apps.get_model(app_label, self.model_name)
        if self.allow_migrate_model(schema_editor.connection.alias, model):
            BaseDatabaseSchemaEditor.add_field(schema_editor, model, model._meta.get_field(self.name))


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0034_alerts2_db_defaults"),
    ]

    operations = [
        AddColumnInPlace(
            model_name="dailyusage",
            name="cache_write_1h_tokens",
            field=models.PositiveBigIntegerField(
                db_default=0,
                default=0,
                help_text="Of the cache writes, those to Anthropic's 1-hour cache (part of cache_write_tokens).",
            ),
        ),
    ]
