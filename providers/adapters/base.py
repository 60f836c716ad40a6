"""The one interface every provider adapter implements.

Requests and responses are OpenAI chat-completion shapes (plain dicts, as they travel on the wire):
``complete`` returns a ``chat.completion`` object, ``stream`` yields ``chat.completion.chunk``
objects. An adapter for another wire protocol translates both ways, so that everything above the
adapter speaks one format. Model: LiteLLM's ``BaseConfig`` (required methods, optional hooks).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from ..exceptions import ProviderError
from ..rules import apply_parameter_rules
from ..types import HealthResult, ProviderConfig, ResolvedModel, UpstreamModel


class BaseAdapter(ABC):
    """Wraps one pooled SDK client for one provider configuration."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"<{type(self).__name__} provider={self.config.name!r} base_url={self.config.base_url!r}>"

    # Required -------------------------------------------------------------------------------------

    @abstractmethod
    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a non-streaming chat completion; ``body["model"]`` is already the provider's model id."""

    @abstractmethod
    def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield OpenAI-style chunks as they arrive. The last chunk before the end carries ``usage``
        whenever the provider reports it (adapters ask for it even when the client did not).
        Closing the iterator (``aclose``) aborts the upstream request."""

    @abstractmethod
    async def list_models(self) -> list[UpstreamModel]:
        """The provider's own model list."""

    @abstractmethod
    def map_error(self, exc: BaseException) -> ProviderError:
        """Translate an SDK or transport exception into our ``ProviderError`` family."""

    # Optional hooks -------------------------------------------------------------------------------

    def prepare_request(self, body: dict[str, Any], model: ResolvedModel) -> dict[str, Any]:
        """Rewrite a client request for ``model``: its upstream id and its parameter rules.

        Overridden by adapters whose providers need more (none yet; Gemini will)."""
        prepared = apply_parameter_rules(body, model.parameter_rules)
        if prepared is body:
            prepared = dict(body)
        prepared["model"] = model.upstream_id
        return prepared

    async def health_check(self) -> HealthResult:
        """Default: time a model listing. Overridden by providers without a model list endpoint."""
        started = time.perf_counter()
        try:
            models = await self.list_models()
        except ProviderError as exc:
            return HealthResult(ok=False, latency_ms=_ms_since(started), error=exc.message)
        return HealthResult(ok=True, latency_ms=_ms_since(started), models_seen=len(models))

    async def aclose(self) -> None:  # noqa: B027  (an optional hook: adapters without a client keep it)
        """Release the pooled HTTP client."""


def _ms_since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)
