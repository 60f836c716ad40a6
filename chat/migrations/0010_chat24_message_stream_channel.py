# The channel-layer name of the consumer streaming a reply: a takeover (its client's send from a new socket) tells that
# consumer at once, in whichever server process it runs, instead of its turn noticing at its next checkpoint or
# heartbeat. Rows from before have none (empty): their turns notice as before.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0009_chat23_message_stream_client"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="stream_channel",
            field=models.CharField(blank=True, db_default="", default="", max_length=100),
        ),
    ]
