"""What only Azure OpenAI does (the contract suite covers the rest): its URLs, its key header, its api-version."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.urls import reverse

from providers.adapters.azure import AzureOpenAIAdapter
from providers.adapters.registry import adapter_class_for_kind
from providers.fields import Secret
from providers.models import Provider, ProviderKind
from providers.selectors import provider_config
from providers.types import ProviderConfig

API_KEY = "azure-adapter-test-key-0123456789abcdef"


def make_config(upstream, **overrides) -> ProviderConfig:
    values = {
        "id": 9301,
        "name": "fake-azure",
        "kind": "azure_openai",
        "base_url": upstream.base_url,
        "api_key": Secret(API_KEY),
        "api_version": "2024-10-21",
        "timeout": 5.0,
    }
    values.update(overrides)
    return ProviderConfig(**values)


@pytest.fixture
async def adapter(fake_upstream):
    adapter = AzureOpenAIAdapter(make_config(fake_upstream))
    yield adapter
    await adapter.aclose()


async def test_a_completion_goes_to_the_deployment_with_the_api_version_and_key_header(adapter, fake_upstream):
    completion = await adapter.complete({"model": "prod-gpt4o", "messages": [{"role": "user", "content": "hi"}]})

    assert completion["choices"][0]["message"]["content"] == "Echo: hi"
    sent = fake_upstream.requests[-1]
    assert sent["path"] == "/openai/deployments/prod-gpt4o/chat/completions"
    assert sent["headers"]["api-key"].endswith(API_KEY[-4:])
    assert "authorization" not in sent["headers"]


async def test_embeddings_go_to_the_deployment(adapter, fake_upstream):
    response = await adapter.embed({"model": "prod-embed", "input": "one two"})

    assert response["usage"]["prompt_tokens"] == 2
    assert fake_upstream.requests[-1]["path"] == "/openai/deployments/prod-embed/embeddings"


def test_an_azure_config_without_api_version_is_refused(fake_upstream):
    with pytest.raises(ImproperlyConfigured, match="api_version"):
        AzureOpenAIAdapter(make_config(fake_upstream, api_version=""))


def test_an_azure_provider_needs_an_api_version():
    provider = Provider(name="azure-east", kind=ProviderKind.AZURE_OPENAI, base_url="https://east.openai.azure.com")
    with pytest.raises(ValidationError) as caught:
        provider.clean()
    assert "api_version" in caught.value.message_dict

    provider.api_version = "2024-10-21"
    provider.clean()


def test_an_azure_provider_needs_a_base_url():
    provider = Provider(name="azure-east", kind=ProviderKind.AZURE_OPENAI, api_version="2024-10-21")
    with pytest.raises(ValidationError) as caught:
        provider.clean()
    assert "base_url" in caught.value.message_dict


def azure_form(base_url: str, **overrides: object) -> dict[str, object]:
    data = {
        "name": "azure-east",
        "kind": ProviderKind.AZURE_OPENAI,
        "enabled": "on",
        "base_url": base_url,
        "api_key": API_KEY,
        "organization": "",
        "api_version": "2024-10-21",
        "extra_headers": "{}",
        "timeout_seconds": "5",
        "byok": "disabled",
    }
    data.update(overrides)
    return data


@pytest.mark.django_db
def test_the_admin_asks_for_an_api_version_and_the_saved_provider_answers(admin_client, fake_upstream):
    add_url = reverse("admin:providers_provider_add")
    refused = admin_client.post(add_url, azure_form(fake_upstream.base_url, api_version=""))
    assert refused.status_code == 200
    assert "Azure OpenAI needs an api-version" in refused.content.decode()
    assert not Provider.objects.exists()

    assert admin_client.post(add_url, azure_form(fake_upstream.base_url)).status_code == 302
    provider = Provider.objects.get(name="azure-east")
    assert provider.api_version == "2024-10-21"

    async def check_health():
        adapter = adapter_class_for_kind(provider.kind)(provider_config(provider))
        try:
            return await adapter.health_check()
        finally:
            await adapter.aclose()

    health = async_to_sync(check_health)()
    assert health.ok, health.error
    assert fake_upstream.requests[-1]["path"] == "/openai/models"
