from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0027_server_tool_billing_web_search_price"),
    ]

    operations = [
        migrations.AddField(
            model_name="deployment",
            name="searches_every_request",
            field=models.CharField(
                blank=True,
                choices=[
                    ("", "By the upstream id (yes for OpenAI's search models)"),
                    ("always", "Always: every request runs a web search"),
                    ("never", "Never: only a request's web_search_options asks for one"),
                ],
                db_default="",
                default="",
                help_text="Whether the upstream model searches the web before every answer, asked or not (OpenAI's gpt-4o-search-preview, gpt-4o-mini-search-preview and gpt-5-search-api do), each request then counted one search at the web search price, reserved at admission. Empty: yes for an upstream id of OpenAI's search models (also dated or under a router's openai/ prefix), no for any other; an Azure deployment named otherwise, or another provider's searching model, is set to always here.",
                max_length=8,
                verbose_name="searches on every request",
            ),
        ),
    ]
