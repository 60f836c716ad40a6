"""The adapter registry: kinds to classes, and one pooled adapter (one SDK client) per provider and loop."""

from __future__ import annotations

import dataclasses

import pytest
from django.core.exceptions import ImproperlyConfigured

from providers.adapters import adapter_class_for_kind, adapter_for
from providers.adapters.openai import OpenAIAdapter
from providers.adapters.registry import adapters_close_all
from providers.fields import Secret
from providers.models import ProviderKind
from providers.selectors import provider_config
from providers.types import ProviderConfig
from tests.factories import ProviderFactory

# Every kind not named here speaks OpenAI's protocol through the OpenAI adapter itself.
_TRANSLATING_ADAPTERS = {
    ProviderKind.OPENAI: "OpenAIPlatformAdapter",  # the OpenAI adapter, with OpenAI's own name for the output limit
    ProviderKind.OPENROUTER: "OpenRouterAdapter",  # the OpenAI adapter, counting its web plugin's results
    ProviderKind.ANTHROPIC: "AnthropicAdapter",
    ProviderKind.AZURE_OPENAI: "AzureOpenAIAdapter",
    ProviderKind.MISTRAL: "MistralAdapter",
    ProviderKind.OLLAMA: "OllamaAdapter",
    ProviderKind.GEMINI: "GeminiAdapter",
    ProviderKind.COHERE: "CohereAdapter",
}


@pytest.mark.parametrize("kind", list(ProviderKind))
def test_every_kind_has_an_adapter(kind):
    adapter_class = adapter_class_for_kind(kind)
    assert adapter_class.__name__ == _TRANSLATING_ADAPTERS.get(kind, "OpenAIAdapter")
    if kind not in _TRANSLATING_ADAPTERS:
        assert adapter_class is OpenAIAdapter


def test_an_unknown_kind_is_a_configuration_error():
    with pytest.raises(ImproperlyConfigured, match="no-such-kind"):
        adapter_class_for_kind("no-such-kind")


def test_the_registry_follows_the_setting(settings):
    settings.LLMHUB_ADAPTERS = {**settings.LLMHUB_ADAPTERS, "gemini": "providers.adapters.openai.OpenAIAdapter"}
    assert adapter_class_for_kind("gemini") is OpenAIAdapter


@pytest.fixture
def row_config(db, fake_upstream) -> ProviderConfig:
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1", extra_headers={"X-Team": "red"})
    return provider_config(provider)


async def test_one_pooled_adapter_per_provider_in_a_loop(row_config, fake_upstream):
    try:
        adapter = adapter_for(row_config)
        assert adapter_for(row_config) is adapter
        # An equal snapshot (a cache reload of an unchanged row) shares the client too.
        assert adapter_for(dataclasses.replace(row_config)) is adapter

        completion = await adapter.complete(
            {"model": "fake-gpt-4o-mini", "messages": [{"role": "user", "content": "pooled"}]}
        )
        assert completion["choices"][0]["message"]["content"] == "Echo: pooled"
        assert fake_upstream.requests[-1]["headers"]["x-team"] == "red"

        other = adapter_for(dataclasses.replace(row_config, id=row_config.id + 1000))
        assert other is not adapter
    finally:
        await adapters_close_all()


@pytest.mark.parametrize(
    "change",
    [
        {"api_key": Secret("sk-rotated-key-000000000000")},
        {"base_url": "http://127.0.0.1:9/v1"},
        {"timeout": 3.0},
        {"extra_headers": (("X-Team", "blue"),)},
    ],
)
async def test_a_changed_config_builds_a_new_adapter(row_config, change):
    try:
        adapter = adapter_for(row_config)
        changed = dataclasses.replace(row_config, **change)

        fresh = adapter_for(changed)

        assert fresh is not adapter
        assert fresh.config == changed
        assert adapter_for(changed) is fresh
    finally:
        await adapters_close_all()


def test_outside_an_event_loop_each_call_gets_its_own_adapter(row_config):
    first = adapter_for(row_config)
    second = adapter_for(row_config)

    assert isinstance(first, OpenAIAdapter)
    assert first is not second


async def test_adapters_close_all_empties_the_pool(row_config):
    adapter = adapter_for(row_config)
    await adapters_close_all()

    assert adapter_for(row_config) is not adapter
    await adapters_close_all()
