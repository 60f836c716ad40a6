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
from typing import Any

import openai
from django.core.exceptions import ImproperlyConfigured

from ..types import ProviderConfig, ResolvedModel
from .common import http_timeout, provider_http_client
from .openai import OPENAI_IMAGE_URLS, OPENAI_STOP_MAX, OpenAIAdapter

# Given when the row has no key, so that the SDK never falls back to the gateway's own environment
# (AZURE_OPENAI_API_KEY, AZURE_OPENAI_AD_TOKEN): the resource then answers 401, which is the truth.
_PLACEHOLDER_KEY = "not-configured"


# The first api-version with ``max_completion_tokens`` (2024-09-01-preview, deprecating ``max_tokens``); every later
# one, GA (2024-10-21 on) or preview, has it. Azure's o-series and gpt-5 deployments take no other limit, and older
# api-versions refuse it ("Unrecognized request argument supplied").
_MAX_COMPLETION_TOKENS_SINCE = "2024-09-01"


# The first api-version with a chat completion's ``service_tier`` (``auto``, ``default``, ``priority``: Azure's
# priority processing, whose prerequisites name 2025-10-01-preview or later); an older one refuses the field
# ("Unrecognized request argument supplied") and serves every request at standard processing.
_SERVICE_TIER_SINCE = "2025-10-01"
# The tier a request that asks none is served at: the deployment's own (``default``, or ``priority`` where priority
# processing is on).
AUTO_TIER = "auto"


def _dated_since(api_version: str, since: str) -> bool:
    """Whether ``api_version`` is ``since`` or later: a dated one (``2024-10-21``, ``2025-10-01-preview``) compared by
    its date, or the v1 API's undated ``preview``/``latest``, newer than any dated one."""
    dated = re.match(r"\d{4}-\d{2}-\d{2}", api_version.strip())
    return dated is None or dated.group() >= since


def takes_max_completion_tokens(api_version: str) -> bool:
    """Whether Azure OpenAI's ``api_version`` reads ``max_completion_tokens``: a dated one from 2024-09-01(-preview)
    on, or the v1 API's undated ``preview``/``latest``, newer than any dated one."""
    return _dated_since(api_version, _MAX_COMPLETION_TOKENS_SINCE)


def takes_service_tier(api_version: str) -> bool:
    """Whether Azure OpenAI's ``api_version`` reads a chat completion's ``service_tier`` (from 2025-10-01-preview on,
    or the v1 API's undated ones)."""
    return _dated_since(api_version, _SERVICE_TIER_SINCE)


class AzureOpenAIAdapter(OpenAIAdapter):
    """Sends a chat reply's output limit as ``max_completion_tokens`` where the configured api-version has it
    (``takes_max_completion_tokens``), as OpenAI's own adapter does: its reasoning deployments (o-series, gpt-5) refuse
    ``max_tokens``, and every deployment reads the new name as the same limit. An older api-version, which refuses
    ``max_completion_tokens``, gets the limit as ``max_tokens`` (a client's own ``max_completion_tokens`` too).

    A /v1/messages request's ``standard_only`` is sent as Azure's ``default`` tier (standard processing, whatever the
    deployment's own tier: a deployment with priority processing on serves ``auto`` or none at priority), and a
    request that asks no tier as ``auto``, so that the reply says the tier served. An api-version older than
    2025-10-01-preview knows no ``service_tier`` and has no priority processing: the field is not sent to it
    (``prepare_request``), and its requests are served at standard processing."""

    serves_completions = False  # its deployments are chat deployments (/v1/completions: docs/completions.md)
    messages_stop_max = OPENAI_STOP_MAX
    messages_standard_tier = "default"
    image_urls = OPENAI_IMAGE_URLS

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        takes_new_name = takes_max_completion_tokens(config.api_version)
        self.output_limit = "max_completion_tokens" if takes_new_name else "max_tokens"

    @classmethod
    def sends_service_tier(cls, config: ProviderConfig) -> bool:
        """Only to an api-version that reads it (``takes_service_tier``)."""
        return takes_service_tier(config.api_version)

    def prepare_request(self, body: dict[str, Any], model: ResolvedModel) -> dict[str, Any]:
        """As the OpenAI adapter's, without ``service_tier`` for an api-version that does not read it (its 400
        "Unrecognized request argument supplied"): a request to it is served at standard processing whatever it
        asks, and charged so (``sends_service_tier``). An api-version that reads it is sent ``auto`` for a request
        that asks no tier, what Azure serves it at anyway (the deployment's own tier): Azure's reply says the tier
        it served (priority on a deployment with priority processing on) only when the request set one. Only where the
        deployment prices priority (``priority_price_factor``): elsewhere a tier the reply says changes no price, and a
        deployment sent exactly what its client sent cannot be broken by a field its api-version may not know."""
        prepared = super().prepare_request(body, model)
        if not self.sends_service_tier(self.config):
            prepared.pop("service_tier", None)
        elif prepared.get("service_tier") is None and model.priority_price_factor is not None:
            prepared["service_tier"] = AUTO_TIER
        return prepared

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
