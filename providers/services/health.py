"""Health checks of providers (and, with routing, of deployments): cheap probes whose results are kept.

Adapter calls are async (the SDK clients are). The sync entry points (admin actions, Celery tasks,
management commands) run them with ``async_to_sync`` on a one-shot adapter that is closed afterwards:
the pooled adapters of ``adapter_for`` belong to a long-lived loop, and a pooled client created in a
loop that ends right after the call would never be closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from asgiref.sync import async_to_sync
from django.utils import timezone

from ..adapters import adapter_class_for_kind, adapter_for
from ..adapters.base import BaseAdapter
from ..adapters.common import scrub
from ..exceptions import ProviderError
from ..models import HealthStatus, Provider
from ..selectors import provider_config
from ..types import HealthResult, ProviderConfig

# Health checks ------------------------------------------------------------------------------------

_HEALTH_ERROR_MAX = Provider._meta.get_field("last_health_error").max_length


def _scrubbed(message: str, config: ProviderConfig) -> str:
    """Adapters word their own messages, but a provider may echo the key (or a credential header) back in
    an error body; this text is stored and shown to every admin, so they are masked here whatever the
    adapter did."""
    return scrub(message, config)[:_HEALTH_ERROR_MAX]


async def _probe(adapter: BaseAdapter) -> HealthResult:
    started = time.perf_counter()
    try:
        result = await adapter.health_check()
    except ProviderError as exc:
        # The default health_check() turns these into a result; an adapter's override may let one through.
        result = HealthResult(ok=False, latency_ms=round((time.perf_counter() - started) * 1000), error=exc.message)
    return replace(result, error=_scrubbed(result.error, adapter.config))


async def _probe_once(config: ProviderConfig) -> HealthResult:
    adapter = adapter_class_for_kind(config.kind)(config)
    try:
        return await _probe(adapter)
    finally:
        await adapter.aclose()


async def _probe_many(configs: Sequence[ProviderConfig]) -> list[HealthResult | BaseException]:
    # Concurrently, so that one provider that hangs until its timeout does not delay the others' results.
    return await asyncio.gather(*(_probe_once(config) for config in configs), return_exceptions=True)


def _health_values(result: HealthResult) -> dict[str, Any]:
    return {
        "last_health_status": HealthStatus.OK if result.ok else HealthStatus.FAILING,
        "last_health_latency_ms": result.latency_ms,
        "last_health_error": result.error,
        "last_health_at": timezone.now(),
    }


def _health_store(*, provider: Provider, result: HealthResult) -> None:
    # update(), not save(): the check must not overwrite an admin's concurrent edit of the configuration,
    # nor bump updated_at (which would make every process rebuild its SDK client for this provider).
    values = _health_values(result)
    Provider.objects.filter(pk=provider.pk).update(**values)
    for name, value in values.items():
        setattr(provider, name, value)


async def aprovider_health_check(*, provider: Provider) -> HealthResult:
    """Probe ``provider`` with the running loop's pooled adapter and record the outcome on its row.

    Upstream failures are a failing result; anything else (an adapter bug, an unknown kind) raises."""
    result = await _probe(adapter_for(provider_config(provider)))
    values = _health_values(result)
    await Provider.objects.filter(pk=provider.pk).aupdate(**values)
    for name, value in values.items():
        setattr(provider, name, value)
    return result


def providers_health_check(*, providers: Sequence[Provider]) -> list[HealthResult | Exception]:
    """Probe several providers at once and record each outcome; the list is in the order of ``providers``.

    An exception that is not an upstream failure is returned in place of that provider's result (and its
    row is left as it was), so that one broken provider does not keep the others from being checked."""
    outcomes = async_to_sync(_probe_many)([provider_config(provider) for provider in providers])
    checked: list[HealthResult | Exception] = []
    for provider, outcome in zip(providers, outcomes, strict=True):
        if isinstance(outcome, HealthResult):
            _health_store(provider=provider, result=outcome)
        elif not isinstance(outcome, Exception):
            raise outcome  # cancellation, KeyboardInterrupt: not a per-provider failure
        checked.append(outcome)
    return checked


def provider_health_check(*, provider: Provider) -> HealthResult:
    """Probe ``provider`` from sync code and record the outcome on its row.

    Upstream failures are a failing result; anything else (an adapter bug, an unknown kind) raises."""
    (outcome,) = providers_health_check(providers=[provider])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
