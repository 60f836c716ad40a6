from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0038_rollup2_daily_staff_usage"),
    ]

    operations = [
        migrations.AlterField(
            model_name="usagerecord",
            name="operation",
            field=models.CharField(
                choices=[
                    ("chat", "Chat completion"),
                    ("messages", "Anthropic messages"),
                    ("embeddings", "Embeddings"),
                    ("responses", "OpenAI responses"),
                    ("completions", "Text completions"),
                ],
                default="chat",
                max_length=16,
            ),
        ),
        migrations.AlterField(
            model_name="dailyusage",
            name="operation",
            field=models.CharField(
                blank=True,
                choices=[
                    ("chat", "Chat completion"),
                    ("messages", "Anthropic messages"),
                    ("embeddings", "Embeddings"),
                    ("responses", "OpenAI responses"),
                    ("completions", "Text completions"),
                ],
                db_default="",
                default="",
                help_text="What the requests asked for (the ledger's operation); empty: rolled up before it was kept.",
                max_length=16,
            ),
        ),
        migrations.AlterField(
            model_name="dailystaffusage",
            name="operation",
            field=models.CharField(
                blank=True,
                choices=[
                    ("chat", "Chat completion"),
                    ("messages", "Anthropic messages"),
                    ("embeddings", "Embeddings"),
                    ("responses", "OpenAI responses"),
                    ("completions", "Text completions"),
                ],
                default="",
                max_length=16,
            ),
        ),
    ]
