"""Immutable snapshots of catalog rows, safe to cache in-process and share between coroutines."""

from __future__ import annotations

import json
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
    extra_headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 60.0
    max_retries: int = 2
    enabled: bool = True
    version: datetime | None = None  # the row's updated_at: a changed config builds a new client

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


_json_text = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class WireChunk(dict[str, Any]):
    """A ``chat.completion.chunk`` decoded from an OpenAI-protocol stream, with the exact JSON it came
    in as (``raw``), so that a chunk nobody changed is relayed upstream-byte for byte instead of being
    encoded again. Change it through ``set_model`` / ``drop_usage``, which keep ``raw`` right; any
    other change must set ``raw = None`` (the relay then encodes the dict)."""

    __slots__ = ("raw",)

    def __init__(self, data: dict[str, Any], raw: bytes | None) -> None:
        super().__init__(data)
        self.raw = raw

    def set_model(self, name: str) -> None:
        old = self.get("model")
        if old == name:
            return
        self["model"] = name
        raw = self.raw
        if raw is None:
            return
        self.raw = None
        if not isinstance(old, str):
            return
        # An unescaped `"model":"…"` cannot occur inside a JSON string (its quotes would be escaped),
        # so the first match is the chunk's own key. A spelling we do not find is encoded again.
        old_value = _json_text(old).encode()
        for separator in (b'"model":', b'"model": '):
            needle = separator + old_value
            at = raw.find(needle)
            if at >= 0:
                self.raw = raw[:at] + b'"model":' + _json_text(name).encode() + raw[at + len(needle) :]
                return

    def drop_usage(self) -> None:
        """Remove a usage report the client did not ask for (``"usage": null`` may stay: it is valid)."""
        if self.get("usage") is not None:
            del self["usage"]
            self.raw = None


def chunk_json(chunk: dict[str, Any]) -> bytes:
    """The JSON of a stream chunk: the upstream's own bytes when it is an unchanged ``WireChunk``."""
    raw = getattr(chunk, "raw", None)
    return raw if raw is not None else _json_text(chunk).encode()
