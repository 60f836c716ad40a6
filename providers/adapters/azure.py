"""Adapter for Azure OpenAI: OpenAI's chat-completions and embeddings protocol behind Azure's URLs.

Everything but the client is the OpenAI adapter's. The SDK's ``AsyncAzureOpenAI`` turns each call into
Azure's shape: ``{endpoint}/openai/deployments/{model}/chat/completions?api-version=…`` with the key in
an ``api-key`` header. The catalog model's ``upstream_id`` is therefore the Azure *deployment* name, and
``ProviderConfig.base_url`` is the resource's endpoint (``https://<resource>.openai.azure.com``). The model
list is the data plane's ``GET /openai/models``: the models the resource may deploy, not its deployments
(which only Azure's management API lists), so ``import_models`` offers model ids to map deployments to.
"""

from __future__ import annotations

import re

import openai
from django.core.exceptions import ImproperlyConfigured

from ..types import ProviderConfig
from .common import http_timeout, provider_http_client
from .openai import OPENAI_STOP_MAX, OpenAIAdapter

# Given when the row has no key, so that the SDK never falls back to the gateway's own environment
# (AZURE_OPENAI_API_KEY, AZURE_OPENAI_AD_TOKEN): the resource then answers 401, which is the truth.
_PLACEHOLDER_KEY = "not-configured"


# The first api-version with ``max_completion_tokens`` (2024-09-01-preview, deprecating ``max_tokens``); every later
# one, GA (2024-10-21 on) or preview, has it. Azure's o-series and gpt-5 deployments take no other limit, and older
# api-versions refuse it ("Unrecognized request argument supplied").
_MAX_COMPLETION_TOKENS_SINCE = "2024-09-01"


def takes_max_completion_tokens(api_version: str) -> bool:
    """Whether Azure OpenAI's ``api_version`` reads ``max_completion_tokens``: a dated one from 2024-09-01(-preview)
    on, or the v1 API's undated ``preview``/``latest``, newer than any dated one."""
    dated = re.match(r"\d{4}-\d{2}-\d{2}", api_version.strip())
    return dated is None or dated.group() >= _MAX_COMPLETION_TOKENS_SINCE


class AzureOpenAIAdapter(OpenAIAdapter):
    """Sends a chat reply's output limit as ``max_completion_tokens`` where the configured api-version has it
    (``takes_max_completion_tokens``), as OpenAI's own adapter does: its reasoning deployments (o-series, gpt-5) refuse
    ``max_tokens``, and every deployment reads the new name as the same limit. An older api-version, which refuses
    ``max_completion_tokens``, gets the limit as ``max_tokens`` (a client's own ``max_completion_tokens`` too)."""

    serves_completions = False  # its deployments are chat deployments (/v1/completions: docs/completions.md)
    messages_stop_max = OPENAI_STOP_MAX

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        takes_new_name = takes_max_completion_tokens(config.api_version)
        self.output_limit = "max_completion_tokens" if takes_new_name else "max_tokens"

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
