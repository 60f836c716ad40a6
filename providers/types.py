"""Immutable snapshots of catalog rows, safe to cache in-process and share between coroutines."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from .fields import Secret


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    id: int
    name: str
    kind: str
    base_url: str
    api_key: Secret = field(repr=False)
    organization: str = ""
    # Decrypted, as the SDK client sends them; they may carry a credential, so no repr shows them.
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    timeout: float = 60.0
    max_retries: int = 2
    enabled: bool = True
    version: datetime | None = None  # the row's updated_at: a changed config builds a new client
    api_version: str = ""  # Azure OpenAI's api-version, Gemini's (v1beta); empty: the adapter's default

    @property
    def cache_key(self) -> tuple[Any, ...]:
        """Everything that shapes the SDK client; two configs with the same key share one client."""
        return (
            self.kind,
            self.base_url,
            self.api_key.reveal(),
            self.organization,
            self.extra_headers,
            self.timeout,
            self.max_retries,
            self.api_version,
        )


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    id: int
    name: str
    upstream_id: str
    provider: ProviderConfig
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None
    context_window: int
    max_output_tokens: int | None
    mode: str = "chat"  # ``ModelMode``: which endpoints the model answers (chat, embedding)
    supports_streaming: bool = True
    supports_tools: bool = True
    supports_vision: bool = False
    supports_json_mode: bool = True
    parameter_rules: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class UpstreamModel:
    """A model as the provider lists it."""

    id: str
    owned_by: str = ""
    display_name: str = ""
    context_window: int | None = None


@dataclass(frozen=True, slots=True)
class HealthResult:
    ok: bool
    latency_ms: int
    error: str = ""
    models_seen: int | None = None
