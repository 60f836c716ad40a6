# The client whose socket streams a reply (the chat page's load, a program's own id): its send from a new socket takes
# the reply over instead of being refused as busy until the server finds the old socket dead. Rows from before have
# none (empty), as replies sent without a client.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0008_chatsweep_message_finish_reason"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="stream_client",
            field=models.CharField(blank=True, db_default="", default="", max_length=64),
        ),
    ]
