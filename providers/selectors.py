"""Reads of the catalog. The ones on the request path are async and cached in-process."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from django.db.models import Prefetch, QuerySet

from core.cache import TTLCache

from .adapters import counts_every_request_search
from .exceptions import ModelNotFoundError, model_not_found
from .models import CatalogModel, Deployment, Provider, ProviderKind
from .tokens import upstream_online
from .types import ProviderConfig, ResolvedDeployment, ResolvedModel

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
        enabled=provider.enabled,
        version=provider.updated_at,
        api_version=provider.api_version,
        byok=provider.byok,
    )


def resolved_deployment(deployment: Deployment) -> ResolvedDeployment:
    return ResolvedDeployment(
        id=deployment.pk,
        name=deployment.name,
        provider=provider_config(deployment.provider),
        upstream_id=deployment.upstream_id,
        input_per_mtok=Decimal(deployment.input_per_mtok),
        output_per_mtok=Decimal(deployment.output_per_mtok),
        cached_input_per_mtok=None
        if deployment.cached_input_per_mtok is None
        else Decimal(deployment.cached_input_per_mtok),
        cache_write_per_mtok=None
        if deployment.cache_write_per_mtok is None
        else Decimal(deployment.cache_write_per_mtok),
        cache_write_1h_per_mtok=None
        if deployment.cache_write_1h_per_mtok is None
        else Decimal(deployment.cache_write_1h_per_mtok),
        web_search_per_1k=Decimal(deployment.web_search_per_1k),
        # Inert on a provider whose adapter counts no such search (``always`` saved before the admin and the catalog
        # file refused it, or through a queryset): admission would hold a search no row is charged.
        searches_every_request=deployment.searches_on_every_request
        and counts_every_request_search(deployment.provider.kind),
        web_plugin_online=deployment.provider.kind == ProviderKind.OPENROUTER
        and upstream_online(deployment.upstream_id),
        priority_price_factor=None
        if deployment.priority_price_factor is None
        else Decimal(deployment.priority_price_factor),
        flex_price_factor=None if deployment.flex_price_factor is None else Decimal(deployment.flex_price_factor),
        weight=deployment.weight,
        priority=deployment.priority,
        rpm_limit=deployment.rpm_limit,
        tpm_limit=deployment.tpm_limit,
        quality=None if deployment.quality is None else float(deployment.quality),
        forced_state=deployment.breaker_override,
        upstream_model_missing_since=deployment.upstream_model_missing,
    )


def _ceiling(prices: list[Decimal | None]) -> Decimal | None:
    known = [price for price in prices if price is not None]
    return max(known) if known else None


def factor_ceiling(factors: list[Decimal | None]) -> Decimal | None:
    """The highest of some deployments' price factors of a tier (``Deployment.priority_price_factor``), one without
    any counted as 1 (the tier at its standard prices); None when none has one."""
    if all(factor is None for factor in factors):
        return None
    return max(Decimal(1) if factor is None else factor for factor in factors)


def resolved_model(model: CatalogModel, deployments: list[Deployment] | None = None) -> ResolvedModel | None:
    """The snapshot of a public model and its usable deployments (enabled, on an enabled provider), or None
    when it has none: a model nobody can serve is not offered. ``deployments``: already loaded (a prefetch
    that filtered them); else they are read from ``model.deployments``."""
    rows = deployments if deployments is not None else list(model.deployments.all())
    usable = sorted(
        (resolved_deployment(row) for row in rows if row.enabled and row.provider.enabled),
        key=lambda d: (d.priority, d.id),
    )
    if not usable:
        return None
    first = usable[0]
    cached = [d.cached_input_per_mtok if d.cached_input_per_mtok is not None else d.input_per_mtok for d in usable]
    writes = [d.cache_write_per_mtok if d.cache_write_per_mtok is not None else d.input_per_mtok for d in usable]
    # A deployment without a 1-hour price charges those writes as its other cache writes (then as input).
    writes_1h = [
        d.cache_write_1h_per_mtok if d.cache_write_1h_per_mtok is not None else write
        for d, write in zip(usable, writes, strict=True)
    ]
    return ResolvedModel(
        id=model.pk,
        name=model.name,
        label=model.label or model.name,
        upstream_id=first.upstream_id,
        provider=first.provider,
        input_per_mtok=max(d.input_per_mtok for d in usable),
        output_per_mtok=max(d.output_per_mtok for d in usable),
        cached_input_per_mtok=None if all(d.cached_input_per_mtok is None for d in usable) else _ceiling(cached),  # type: ignore[arg-type]
        cache_write_per_mtok=None if all(d.cache_write_per_mtok is None for d in usable) else _ceiling(writes),  # type: ignore[arg-type]
        cache_write_1h_per_mtok=None if all(d.cache_write_1h_per_mtok is None for d in usable) else _ceiling(writes_1h),  # type: ignore[arg-type]
        web_search_per_1k=max(d.web_search_per_1k for d in usable),
        searches_every_request=any(d.searches_every_request for d in usable),
        web_plugin_online=any(d.web_plugin_online for d in usable),
        priority_price_factor=factor_ceiling([d.priority_price_factor for d in usable]),
        flex_price_factor=factor_ceiling([d.flex_price_factor for d in usable]),
        context_window=model.context_window,
        max_output_tokens=model.max_output_tokens,
        mode=model.mode,
        supports_streaming=model.supports_streaming,
        supports_tools=model.supports_tools,
        supports_vision=model.supports_vision,
        supports_json_mode=model.supports_json_mode,
        supports_reasoning=model.supports_reasoning,
        parameter_rules=model.parameter_rules or {},
        deployments=tuple(usable),
        strategy=model.strategy,
        retries=model.retries,
        fallbacks=tuple(model.fallbacks or ()),
        context_window_fallbacks=tuple(model.context_window_fallbacks or ()),
        resume_on_failure=model.resume_on_failure,
        stream_idle_timeout=None
        if model.stream_idle_timeout_seconds is None
        else float(model.stream_idle_timeout_seconds),
        moderation_policy_id=model.moderation_policy_id,
    )


def _catalog_rows() -> QuerySet[CatalogModel]:
    return CatalogModel.objects.filter(enabled=True).prefetch_related(
        Prefetch("deployments", queryset=Deployment.objects.select_related("provider"))
    )


async def _load_model(name: str) -> ResolvedModel | None:
    row = await _catalog_rows().select_related("alias_of").filter(name=name).afirst()
    if row is None:
        return None
    if row.alias_of_id is not None:
        # An alias is served by its target: its deployments, prices, routing and allow-list entry.
        target = await _catalog_rows().filter(pk=row.alias_of_id).afirst()
        return None if target is None else resolved_model(target)
    return resolved_model(row)


def model_resolve_sync(name: str) -> ResolvedModel | None:
    """``model_resolve`` for synchronous code (uncached): the model or its alias's target, or None."""
    row = _catalog_rows().filter(name=name).first()
    if row is not None and row.alias_of_id is not None:
        row = _catalog_rows().filter(pk=row.alias_of_id).first()
    return None if row is None else resolved_model(row)


async def model_resolve(name: str) -> ResolvedModel:
    """Public model name (or alias) → catalog entry with its deployments; 404-style error for an unknown
    or disabled model, or one with no usable deployment."""
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError("You must provide a model parameter.", param="model")
    model = await catalog_cache.get_or_load(("model", name), lambda: _load_model(name))
    if model is None:
        raise model_not_found(name)
    return model


def _enabled(rows: list[CatalogModel]) -> list[ResolvedModel]:
    by_id = {row.pk: row for row in rows}
    models: list[ResolvedModel] = []
    for row in rows:
        target = by_id.get(row.alias_of_id) if row.alias_of_id is not None else row
        if target is None or target.alias_of_id is not None:
            continue
        resolved = resolved_model(target)
        if resolved is None:
            continue
        # An alias is listed under its own name, and is the target for everything else (id, allow-lists).
        models.append(resolved if target is row else replace(resolved, name=row.name, label=row.label or row.name))
    return sorted(models, key=lambda m: m.name)


async def _load_enabled() -> list[ResolvedModel]:
    return _enabled([row async for row in _catalog_rows()])


async def models_enabled() -> list[ResolvedModel]:
    """Every public name a client could be offered (aliases included, under their own name), before plan
    and key allow-lists narrow it."""
    return await catalog_cache.get_or_load(_ENABLED_KEY, _load_enabled)  # type: ignore[arg-type,return-value]


def models_enabled_sync() -> list[ResolvedModel]:
    return _enabled(list(_catalog_rows()))
