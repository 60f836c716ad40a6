from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0021_byok3_extra_headers_help"),
    ]

    operations = [
        migrations.AddField(
            model_name="providercredential",
            name="unchecked_at",
            field=models.DateTimeField(
                blank=True,
                help_text="When the daily check last tried the key and its provider could not be asked (unreachable, 5xx…): not checked, good or bad, but tried; with the last check, what puts it behind the others in the next run.",
                null=True,
            ),
        ),
    ]
