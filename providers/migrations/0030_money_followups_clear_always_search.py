from django.db import migrations

# A deployment set to search on every request (searches_every_request "always") on a provider whose adapter counts no
# such search (Claude, Gemini, Cohere, Ollama: BaseAdapter.counts_every_request_search), saved before 71844da refused
# it or through a queryset update: each request held a search at admission that its row was never charged. The
# deployment's snapshot reads it as never since (providers.selectors.resolved_deployment); the field is cleared, so the
# admin's form and the catalog file say what is served. The kinds are the adapters' configured now
# (settings.LLMHUB_ADAPTERS), as the admin judges them.


def clear(apps, schema_editor):
    from providers.adapters import counts_every_request_search

    Deployment = apps.get_model("providers", "Deployment")
    always = Deployment.objects.filter(searches_every_request="always")
    kinds = set(always.values_list("provider__kind", flat=True))
    refused = [kind for kind in kinds if not counts_every_request_search(kind)]
    if refused:
        always.filter(provider__kind__in=refused).update(searches_every_request="")


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0029_tier_prices_deployment_tier_factors"),
    ]

    operations = [migrations.RunPython(clear, migrations.RunPython.noop)]
