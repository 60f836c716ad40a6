from urllib.parse import urlsplit

from django.db import migrations, models

# As providers.models.DEFAULT_BASE_URLS and url_origin at the time of this migration.
_DEFAULTS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "openrouter": "https://openrouter.ai/api/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "vllm": "http://127.0.0.1:8000/v1",
    "mistral": "https://api.mistral.ai/v1",
    "gemini": "https://generativelanguage.googleapis.com",
    "cohere": "https://api.cohere.com",
}


def _origin(url):
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if not scheme or not host:
        return ""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + (f":{port}" if port and port != {"http": 80, "https": 443}.get(scheme) else "")


def agree_current_hosts(apps, schema_editor):
    """The keys stored before: agreed for the host their provider points at now."""
    Provider = apps.get_model("providers", "Provider")
    ProviderCredential = apps.get_model("providers", "ProviderCredential")
    for provider in Provider.objects.filter(credentials__isnull=False).distinct():
        origin = _origin(provider.base_url or _DEFAULTS.get(provider.kind, ""))
        ProviderCredential.objects.filter(provider=provider).update(confirmed_origin=origin)


class Migration(migrations.Migration):
    dependencies = [("providers", "0019_tasks2_credential_invalid_notice_due")]

    operations = [
        migrations.AddField(
            model_name="providercredential",
            name="confirmed_origin",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                help_text="The host (scheme://host:port) its owner agreed to send it to: the provider's when the "
                "key was saved, or the one they confirmed. While the provider points elsewhere, the key is paused "
                "(not used).",
                max_length=300,
            ),
        ),
        migrations.RunPython(agree_current_hosts, migrations.RunPython.noop),
    ]
