"""PostgreSQL vacuums the ledger after every 100,000 rows inserted, not after a fifth of the table.

An experiment's results, the dashboards' raw reads and the experiments' first fold are index-only scans
(``billing_usage_experiment_cover``): PostgreSQL answers them from the index alone only for heap pages its
visibility map marks all-visible, and only VACUUM sets those marks. For every row on a page without one it
reads the heap page too. The ledger only grows, and by default autovacuum vacuums an insert-only table after
``autovacuum_vacuum_insert_scale_factor`` (20 %) of its rows have been added: 2 million rows at 10 million,
days of traffic, which are the rows a running experiment reads. Measured at 10 million rows
(``bench.ledger_scale``, docs/ledger.md): the experiment's results took 610-660 ms with the map cleared
and 70-110 ms with it set.

A vacuum after that many inserts reads only the pages changed since the last one (the map tells it
which) and, with no dead rows, skips the indexes: 0.8 s for 50,771 rows added to a 10-million-row ledger
with 2.4 GB of indexes. The settings are the table's own storage parameters, so ``postgresql.conf`` is
left alone. SQLite has no such thing, and nothing is done there."""

from django.db import migrations

SETTINGS = {
    "autovacuum_vacuum_insert_threshold": "100000",
    "autovacuum_vacuum_insert_scale_factor": "0",
}


def _ledger(apps, schema_editor) -> str | None:
    """The ledger's quoted table name on PostgreSQL; None elsewhere."""
    if schema_editor.connection.vendor != "postgresql":
        return None
    return schema_editor.quote_name(apps.get_model("billing", "UsageRecord")._meta.db_table)


def tune(apps, schema_editor):
    if table := _ledger(apps, schema_editor):
        values = ", ".join(f"{name} = {value}" for name, value in SETTINGS.items())
        schema_editor.execute(f"ALTER TABLE {table} SET ({values})")


def untune(apps, schema_editor):
    if table := _ledger(apps, schema_editor):
        schema_editor.execute(f"ALTER TABLE {table} RESET ({', '.join(SETTINGS)})")


class Migration(migrations.Migration):
    dependencies = [("billing", "0018_ledger_user_key_indexes_covered")]

    operations = [migrations.RunPython(tune, untune, elidable=False)]
