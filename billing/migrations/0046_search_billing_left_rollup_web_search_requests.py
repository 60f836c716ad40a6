from django.db import migrations, models

from core.migration_operations import AddColumnInPlace

# The rollups sum the ledger's web searches (0044) as they sum its tokens. Added in place (no table rewritten): a day
# rolled up before this migration says 0 until it is rebuilt (the rollup task rebuilds today and yesterday within 10
# minutes; an older day by the rollup admin's rebuild action, while the ledger still has its rows).


def _field() -> models.PositiveBigIntegerField:
    return models.PositiveBigIntegerField(
        db_default=0,
        default=0,
        help_text="Web searches the providers billed apart from the tokens (the ledger's web_search_requests).",
    )


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0045_alerts_rename_rule_follows_model"),
    ]

    operations = [
        AddColumnInPlace(model_name=name, name="web_search_requests", field=_field())
        for name in ("dailyusage", "dailystaffusage", "dailyuserusage")
    ]
