"""Reads of the catalog. The ones on the request path are async and cached in-process."""

from __future__ import annotations

from decimal import Decimal

from .cache import TTLCache
from .exceptions import ModelNotFoundError
from .models import Model, Provider
from .types import ProviderConfig, ResolvedModel

catalog_cache: TTLCache[ResolvedModel | None] = TTLCache("catalog")
_ENABLED_KEY = ("__enabled_models__",)


def provider_config(provider: Provider) -> ProviderConfig:
    return ProviderConfig(
        id=provider.pk,
        name=provider.name,
        kind=provider.kind,
        base_url=provider.effective_base_url,
        api_key=provider.api_key,
        organization=provider.organization,
        extra_headers=tuple(sorted((name, value.reveal()) for name, value in (provider.extra_headers or {}).items())),
        timeout=float(provider.timeout_seconds),
        max_retries=provider.max_retries,
        enabled=provider.enabled,
        version=provider.updated_at,
        api_version=provider.api_version,
    )


def resolved_model(model: Model) -> ResolvedModel:
    return ResolvedModel(
        id=model.pk,
        name=model.name,
        upstream_id=model.upstream_id,
        provider=provider_config(model.provider),
        input_per_mtok=Decimal(model.input_per_mtok),
        output_per_mtok=Decimal(model.output_per_mtok),
        cached_input_per_mtok=None if model.cached_input_per_mtok is None else Decimal(model.cached_input_per_mtok),
        context_window=model.context_window,
        max_output_tokens=model.max_output_tokens,
        mode=model.mode,
        supports_streaming=model.supports_streaming,
        supports_tools=model.supports_tools,
        supports_vision=model.supports_vision,
        supports_json_mode=model.supports_json_mode,
        parameter_rules=model.parameter_rules or {},
    )


async def _load_model(name: str) -> ResolvedModel | None:
    row = (
        await Model.objects.select_related("provider").filter(name=name, enabled=True, provider__enabled=True).afirst()
    )
    return None if row is None else resolved_model(row)


async def model_resolve(name: str) -> ResolvedModel:
    """Public model name → catalog entry with its provider; 404-style error for unknown or disabled."""
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError("You must provide a model parameter.", param="model")
    model = await catalog_cache.get_or_load(("model", name), lambda: _load_model(name))
    if model is None:
        raise ModelNotFoundError(f"The model `{name}` does not exist or you do not have access to it.", param="model")
    return model


async def _load_enabled() -> list[ResolvedModel]:
    return [
        resolved_model(row)
        async for row in Model.objects.select_related("provider")
        .filter(enabled=True, provider__enabled=True)
        .order_by("name")
    ]


async def models_enabled() -> list[ResolvedModel]:
    """Every model a client could be offered, before plan and key allow-lists narrow it."""
    return await catalog_cache.get_or_load(_ENABLED_KEY, _load_enabled)  # type: ignore[arg-type,return-value]


def models_enabled_sync() -> list[ResolvedModel]:
    return [
        resolved_model(row)
        for row in Model.objects.select_related("provider")
        .filter(enabled=True, provider__enabled=True)
        .order_by("name")
    ]
