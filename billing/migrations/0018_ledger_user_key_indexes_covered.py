"""The ledger's user and key columns lose their single-column indexes: ``(user, created_at)`` and
``(api_key, created_at)`` serve every lookup by either alone (their leftmost column), and every insert
wrote the two extra btrees (docs/ledger.md, "Indexes").

The indexes are dropped by name as the database reports them, not by ``AlterField``: on SQLite that would
copy the whole table twice (SQLite cannot drop a column's index through ``ALTER TABLE``, so Django remakes
the table), which for a large embedded ledger is minutes with the database locked. The state change is
the same ``AlterField`` either way."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

COLUMNS = ("user_id", "api_key_id")


def _single_column_indexes(schema_editor, table: str) -> dict[str, str]:
    """Column → name of the non-unique index on that column alone, for the columns above."""
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, table)
    return {
        info["columns"][0]: name
        for name, info in constraints.items()
        if info.get("index")
        and not info.get("unique")
        and not info.get("primary_key")
        and len(info.get("columns") or ()) == 1
        and info["columns"][0] in COLUMNS
    }


def drop_indexes(apps, schema_editor):
    table = apps.get_model("billing", "UsageRecord")._meta.db_table
    for name in _single_column_indexes(schema_editor, table).values():
        schema_editor.execute(f"DROP INDEX {schema_editor.quote_name(name)}")


def create_indexes(apps, schema_editor):
    table = apps.get_model("billing", "UsageRecord")._meta.db_table
    present = _single_column_indexes(schema_editor, table)
    for column in COLUMNS:
        if column not in present:
            name = schema_editor.quote_name(f"{table}_{column}_single")
            column_sql = schema_editor.quote_name(column)
            schema_editor.execute(f"CREATE INDEX {name} ON {schema_editor.quote_name(table)} ({column_sql})")


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0017_inflight_settled_row"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(drop_indexes, create_indexes)],
            state_operations=[
                migrations.AlterField(
                    model_name="usagerecord",
                    name="api_key",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="usage",
                        to="billing.apikey",
                    ),
                ),
                migrations.AlterField(
                    model_name="usagerecord",
                    name="user",
                    field=models.ForeignKey(
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
        )
    ]
