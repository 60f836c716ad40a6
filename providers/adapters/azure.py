"""Adapter for Azure OpenAI: OpenAI's chat-completions and embeddings protocol behind Azure's URLs.

Everything but the client is the OpenAI adapter's. The SDK's ``AsyncAzureOpenAI`` turns each call into
Azure's shape: ``{endpoint}/openai/deployments/{model}/chat/completions?api-version=…`` with the key in
an ``api-key`` header. The catalog model's ``upstream_id`` is therefore the Azure *deployment* name, and
``ProviderConfig.base_url`` is the resource's endpoint (``https://<resource>.openai.azure.com``). The model
list is the data plane's ``GET /openai/models``: the models the resource may deploy, not its deployments
(which only Azure's management API lists), so ``import_models`` offers model ids to map deployments to.
"""

from __future__ import annotations

import openai
from django.core.exceptions import ImproperlyConfigured

from ..types import ProviderConfig
from .common import http_timeout, provider_http_client
from .openai import OpenAIAdapter

# Given when the row has no key, so that the SDK never falls back to the gateway's own environment
# (AZURE_OPENAI_API_KEY, AZURE_OPENAI_AD_TOKEN): the resource then answers 401, which is the truth.
_PLACEHOLDER_KEY = "not-configured"


class AzureOpenAIAdapter(OpenAIAdapter):
    serves_completions = False  # its deployments are chat deployments (/v1/completions: docs/completions.md)

    def _sdk_client(self, config: ProviderConfig) -> openai.AsyncOpenAI:
        if not config.api_version:
            # Without one the SDK would read OPENAI_API_VERSION from the gateway's environment.
            raise ImproperlyConfigured(f"The Azure OpenAI provider {config.name!r} has no api_version.")
        return openai.AsyncAzureOpenAI(
            azure_endpoint=config.base_url,
            api_version=config.api_version,
            api_key=config.api_key.reveal() or _PLACEHOLDER_KEY,
            organization=config.organization or None,
            timeout=http_timeout(config),
            max_retries=0,  # retries are the router's (chat.pipeline): the SDK's would multiply them
            default_headers=dict(config.extra_headers),
            http_client=provider_http_client(config),
        )
