import providers.fields
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0020_byokhost_confirmed_origin"),
    ]

    operations = [
        migrations.AlterField(
            model_name="provider",
            name="extra_headers",
            field=providers.fields.EncryptedMappingField(
                blank=True,
                default=dict,
                help_text="Sent with every upstream request. Values are encrypted at rest and shown masked (…abcd): leave a masked value as it is to keep it, type a new value to replace it, remove the name to drop it. With a user's own key (bring your own key), a header whose name says auth, key, token, secret, cookie, password, organization, project, account, tenant or workspace (Authorization, OpenAI-Project, Helicone-Auth…) is not sent: it is the platform's; the others (HTTP-Referer, X-Title, anthropic-beta…) are.",
            ),
        ),
    ]
