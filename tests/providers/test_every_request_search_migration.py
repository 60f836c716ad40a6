"""Deployments set to search on every request (``searches_every_request`` ``always``) on a provider whose adapter
counts no such search (providers 0030): saved before 71844da refused it, each request held a search at admission that
its row was never charged. The migration clears it there (empty: left to the upstream id, which the deployment's
snapshot reads as never on such a provider), and leaves every other row as it was."""

from __future__ import annotations

import pytest

from providers.models import Deployment
from tests.migrating import latest, migrate, migrated_to

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("providers", "0029_tier_prices_deployment_tier_factors")]


def test_always_is_cleared_on_the_providers_that_count_no_such_search():
    with migrated_to(BEFORE) as apps:
        Provider = apps.get_model("providers", "Provider")
        CatalogModel = apps.get_model("providers", "CatalogModel")
        Rows = apps.get_model("providers", "Deployment")
        model = CatalogModel.objects.create(name="m")
        rows = {
            "claude": ("anthropic", "always"),
            "gemini": ("gemini", "always"),
            "cohere": ("cohere", "always"),
            "ollama": ("ollama", "always"),
            "claude-never": ("anthropic", "never"),
            "openai": ("openai", "always"),
            "compatible": ("openai_compatible", "always"),
            "openai-never": ("openai", "never"),
            "openai-auto": ("openai", ""),
        }
        for name, (kind, searches) in rows.items():
            provider = Provider.objects.create(name=name, kind=kind, base_url="http://127.0.0.1:9/v1")
            Rows.objects.create(
                model=model, provider=provider, name=name, upstream_id=name, searches_every_request=searches
            )

        migrate(latest())

        assert dict(Deployment.objects.values_list("name", "searches_every_request")) == {
            "claude": "",
            "gemini": "",
            "cohere": "",
            "ollama": "",
            "claude-never": "never",
            "openai": "always",
            "compatible": "always",
            "openai-never": "never",
            "openai-auto": "",
        }
