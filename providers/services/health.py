"""Health checks of providers and of the deployments they serve: cheap probes whose results are kept.

A round of checks (``health_check_round``, run by the Celery beat task) lists each enabled provider's
models once, which answers for all of its deployments at no cost, and sends a one-token completion only
for the deployments whose admin asked for a paid probe. Each deployment's outcome is kept as a
``HealthCheck`` row, moves its circuit breaker (a failing probe opens it, a passing one closes it) and
opens or closes its ``Incident`` (``incidents``).

Adapter calls are async (the SDK clients are). The sync entry points (admin actions, Celery tasks,
management commands) run them with ``core.async_bridge.run_async`` on a one-shot adapter, closed afterwards:
the pooled adapters of ``adapter_for`` belong to a long-lived loop, and a pooled client created in a
loop that ends right after the call would never be closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from core.async_bridge import run_async

from ..adapters import adapter_class_for_kind, adapter_for
from ..adapters.base import BaseAdapter
from ..adapters.common import scrub
from ..exceptions import ProviderError, ProviderNotFoundError
from ..models import Deployment, HealthCheck, HealthStatus, ModelMode, Provider, ProviderKind
from ..routing.breaker_machine import CLOSED, OPEN
from ..routing.breakers import breaker_force, breaker_reset, breaker_state
from ..selectors import catalog_cache, provider_config, resolved_deployment, resolved_model
from ..types import HealthResult, ProviderConfig, ResolvedModel
from .incidents import incident_close, incident_open, incidents_out_of_service_close

logger = logging.getLogger(__name__)

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
        result = HealthResult(ok=False, latency_ms=_ms_since(started), error=exc.message)
    return replace(result, error=_scrubbed(result.error, adapter.config))


def _ms_since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


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


def provider_health_unchecked(*, provider_id: int, why: str) -> None:
    """Show on the provider's row that llmhub could not check it (its row could not be loaded, its check
    raised), in the fields a failed check writes: its old "OK" would say it was fine. ``why`` is in llmhub's
    own words (an exception's class, never its message, which may quote a key or a host)."""
    Provider.objects.filter(pk=provider_id).update(
        last_health_status=HealthStatus.FAILING,
        last_health_latency_ms=None,
        last_health_error=f"llmhub could not check this provider: {why} (see the worker's log)"[:500],
        last_health_at=timezone.now(),
    )


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
    outcomes = run_async(_probe_many, [provider_config(provider) for provider in providers])
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


# Deployments --------------------------------------------------------------------------------------

# The model list of these kinds does not name what a deployment calls: Azure OpenAI lists the models a
# resource may deploy, while a deployment's upstream id is the name of an Azure deployment.
_LIST_DOES_NOT_NAME_DEPLOYMENTS = frozenset({ProviderKind.AZURE_OPENAI})
_PAID_PROBE_TEXT = "ping"


def incident_after_failures() -> int:
    """Failing probes in a row, each of its own round (``health_round_seconds``), that open an incident (the
    breaker opens at the first)."""
    return max(1, settings.LLMHUB_HEALTH_INCIDENT_AFTER_FAILURES)


def health_round_seconds() -> timedelta:
    """How far apart two failing probes must be to count as two rounds toward an incident."""
    return timedelta(seconds=max(0, settings.LLMHUB_HEALTH_ROUND_SECONDS))


def health_checks_kept() -> tuple[int, timedelta]:
    """How many ``HealthCheck`` rows a deployment keeps at most, and for how long at most."""
    rows = max(1, settings.LLMHUB_HEALTH_CHECKS_KEPT)
    days = max(1, settings.LLMHUB_HEALTH_CHECK_RETENTION_DAYS)
    return rows, timedelta(days=days)


@dataclass(frozen=True, slots=True)
class _Target:
    """What probing one deployment needs, read from the database before the event loop runs."""

    deployment_id: int
    upstream_id: str
    paid: bool
    model: ResolvedModel | None  # bound to the deployment; only paid probes need it


@dataclass(frozen=True, slots=True)
class DeploymentProbe:
    """The outcome of one probe of one deployment."""

    deployment_id: int
    ok: bool
    latency_ms: int | None
    error: str = ""
    paid: bool = False
    # Whether the provider lacks the deployment's upstream id (``upstream_id``, as the round read it): True when
    # its model list does not name it or a paid probe got a 404 for it, False when it was found, None when the
    # probe could not tell (the provider failed, or its list names nothing a deployment calls).
    model_missing: bool | None = None
    upstream_id: str = ""


@dataclass(slots=True)
class ProviderRound:
    """One provider's share of a round: its own result (or why it could not be checked) and its deployments'."""

    provider: Provider
    result: HealthResult | Exception
    deployments: list[DeploymentProbe] = field(default_factory=list)


def _names_match(upstream_id: str, listed: frozenset[str]) -> bool:
    if upstream_id in listed or upstream_id.removeprefix("models/") in listed:  # Gemini's ids may keep it
        return True
    # Ollama lists a model pulled as "llama3.2" under "llama3.2:latest".
    return ":" not in upstream_id and f"{upstream_id}:latest" in listed


async def _listing(adapter: BaseAdapter) -> tuple[HealthResult, frozenset[str] | None]:
    """The free probe: the provider's model list, timed, and the ids it names. An adapter that overrides
    ``health_check`` (a provider without a model list) is probed its own way; it names no ids (None)."""
    if type(adapter).health_check is not BaseAdapter.health_check:
        return await _probe(adapter), None
    started = time.perf_counter()
    try:
        models = await adapter.list_models()
    except ProviderError as exc:
        return HealthResult(ok=False, latency_ms=_ms_since(started), error=_scrubbed(exc.message, adapter.config)), None
    return HealthResult(ok=True, latency_ms=_ms_since(started), models_seen=len(models)), frozenset(
        model.id for model in models
    )


def _listed_outcome(
    target: _Target, config: ProviderConfig, result: HealthResult, listed: frozenset[str] | None
) -> DeploymentProbe:
    if not result.ok:
        return DeploymentProbe(target.deployment_id, ok=False, latency_ms=result.latency_ms, error=result.error)
    # A provider that lists nothing (an empty list, or no list at all) cannot say which models it serves:
    # its answering is all the free probe can tell.
    if not listed or config.kind in _LIST_DOES_NOT_NAME_DEPLOYMENTS:
        return DeploymentProbe(target.deployment_id, ok=True, latency_ms=result.latency_ms)
    if not _names_match(target.upstream_id, listed):
        error = f"The provider {config.name!r} answers, but its model list does not include {target.upstream_id!r}."
        return DeploymentProbe(
            target.deployment_id,
            ok=False,
            latency_ms=result.latency_ms,
            error=error[:500],
            model_missing=True,
            upstream_id=target.upstream_id,
        )
    return DeploymentProbe(
        target.deployment_id, ok=True, latency_ms=result.latency_ms, model_missing=False, upstream_id=target.upstream_id
    )


async def _paid_probe(adapter: BaseAdapter, target: _Target) -> DeploymentProbe:
    """A one-token completion (an embedding of one word, for an embedding model): billed by the provider."""
    model = target.model
    assert model is not None
    started = time.perf_counter()
    try:
        if model.mode == ModelMode.EMBEDDING:
            await adapter.embed({"model": model.upstream_id, "input": _PAID_PROBE_TEXT})
        else:
            body = {"messages": [{"role": "user", "content": _PAID_PROBE_TEXT}], "max_tokens": 1}
            await adapter.complete(adapter.prepare_request(body, model))
    except ProviderError as exc:
        error = _scrubbed(exc.message, adapter.config)
        missing = True if isinstance(exc, ProviderNotFoundError) and exc.upstream_status == 404 else None
        return DeploymentProbe(
            target.deployment_id,
            ok=False,
            latency_ms=_ms_since(started),
            error=error,
            paid=True,
            model_missing=missing,
            upstream_id=target.upstream_id,
        )
    return DeploymentProbe(
        target.deployment_id,
        ok=True,
        latency_ms=_ms_since(started),
        paid=True,
        model_missing=False,
        upstream_id=target.upstream_id,
    )


async def _provider_round(
    config: ProviderConfig, targets: Sequence[_Target]
) -> tuple[HealthResult, list[DeploymentProbe]]:
    """One provider: its model list (which answers for the deployments without a paid probe) and the paid
    probes, all at once."""
    paid = [target for target in targets if target.paid]
    adapter = adapter_class_for_kind(config.kind)(config)
    try:
        listing, *paid_outcomes = await asyncio.gather(
            _listing(adapter), *(_paid_probe(adapter, target) for target in paid), return_exceptions=True
        )
    finally:
        await adapter.aclose()
    if isinstance(listing, BaseException):
        raise listing  # not an upstream failure: the provider could not be checked at all
    result, listed = listing
    probes = [_listed_outcome(target, config, result, listed) for target in targets if not target.paid]
    for target, outcome in zip(paid, paid_outcomes, strict=True):
        if isinstance(outcome, DeploymentProbe):
            probes.append(outcome)
        elif isinstance(outcome, Exception):
            # Not an upstream failure (an adapter bug): nothing is learnt about the deployment.
            logger.error("paid health probe of deployment %s could not run", target.deployment_id, exc_info=outcome)
        else:
            raise outcome
    return result, probes


async def _round(
    work: Sequence[tuple[ProviderConfig, Sequence[_Target]]],
) -> list[tuple[HealthResult, list[DeploymentProbe]] | BaseException]:
    # Concurrently, so that one provider that hangs until its timeout does not delay the others.
    return await asyncio.gather(*(_provider_round(config, targets) for config, targets in work), return_exceptions=True)


def _targets(provider: Provider) -> list[_Target]:
    """The deployments a round probes: enabled, of an enabled public model, on ``provider`` (enabled)."""
    rows = Deployment.objects.filter(provider=provider, enabled=True, model__enabled=True).select_related("model")
    targets = []
    for row in rows:
        row.provider = provider  # already loaded (and its secrets decrypted) once
        model = None
        if row.paid_health_probe:
            unbound = resolved_model(row.model, [row])
            model = unbound.on(resolved_deployment(row)) if unbound is not None else None
        targets.append(_Target(row.pk, row.upstream_id, paid=model is not None, model=model))
    return targets


def health_check_round(*, providers: Sequence[Provider]) -> list[ProviderRound]:
    """Check ``providers`` and the deployments they serve, all at once, and act on what was found.

    Per provider: its model list is fetched once (free) and stored on its row (``last_health_*``, as the
    admin's "Test connection" does); each of its deployments gets a ``HealthCheck`` row (from that list,
    or from a one-token completion when ``paid_health_probe`` is set), its breaker is opened or closed,
    and its incident opened or closed. A provider that cannot be checked (its adapter raised something
    that is not an upstream failure) has the exception in its ``result`` and its row shows it as failing
    (``provider_health_unchecked``); its deployments' rows are left as they were. The open incidents of deployments
    an admin took out of service (disabled, or their model or provider), which no round probes, are closed, told as
    such (``incidents_out_of_service_close``)."""
    work = [(provider_config(provider), _targets(provider)) for provider in providers]
    outcomes = run_async(_round, work)
    rounds: list[ProviderRound] = []
    for provider, outcome in zip(providers, outcomes, strict=True):
        if isinstance(outcome, Exception):
            provider_health_unchecked(provider_id=provider.pk, why=f"its check raised {type(outcome).__name__}")
            rounds.append(ProviderRound(provider, outcome))
            continue
        if isinstance(outcome, BaseException):
            raise outcome  # cancellation, KeyboardInterrupt: not a per-provider failure
        result, probes = outcome
        _health_store(provider=provider, result=result)
        for probe in probes:
            deployment_probe_record(probe=probe)
        rounds.append(ProviderRound(provider, result, probes))
    incidents_out_of_service_close(at=timezone.now())
    health_checks_prune()
    return rounds


def deployment_probe_record(*, probe: DeploymentProbe, at: datetime | None = None) -> HealthCheck | None:
    """Keep ``probe`` and act on it: a failing probe opens the deployment's breaker at once, and its incident
    once ``incident_after_failures()`` probes in a row have failed; a passing probe closes both, except an
    incident the breaker opened (failing completions), which only a paid probe (a completion) closes here.
    None when the deployment was deleted since the round read it (an admin's delete while the providers
    answered)."""
    at = at or timezone.now()
    try:
        # Committed on its own (the task runs in autocommit): the foreign key, checked at commit, fails here.
        with transaction.atomic():
            check = HealthCheck.objects.create(
                deployment_id=probe.deployment_id,
                checked_at=at,
                ok=probe.ok,
                latency_ms=probe.latency_ms,
                error=probe.error[:500],
                paid=probe.paid,
            )
    except IntegrityError:
        if Deployment.objects.filter(pk=probe.deployment_id).exists():
            raise
        return None
    _breaker_follow(probe)
    _model_missing_follow(probe, at)
    if probe.ok:
        incident_close(deployment_id=probe.deployment_id, at=at, spare_breaker_incident=not probe.paid)
    elif _failing_in_a_row(probe.deployment_id, incident_after_failures()):
        incident_open(deployment_id=probe.deployment_id, reason=check.error, at=at)
    return check


def _breaker_follow(probe: DeploymentProbe) -> None:
    """A failing probe opens the breaker at once, for every process (no request has to fail to find out;
    a half-open breaker opens again for twice its cooldown); a passing one closes an open or half-open breaker
    (traffic need not wait for its cooldown). A closed breaker keeps the failures it counted: a model list
    that answers says less about completions than the requests' own outcomes do."""
    if not probe.ok:
        breaker_force(probe.deployment_id, OPEN)
    elif breaker_state(probe.deployment_id).state != CLOSED:
        breaker_reset(probe.deployment_id)


def _model_missing_follow(probe: DeploymentProbe, at: datetime) -> None:
    """Keep on the deployment since when its provider lacks its upstream id, and clear it once found: the request
    path reads it from the catalog snapshot (a 404 for that id is the catalog's mistake, not a user's key's).
    Kept with the id found missing (``Deployment.upstream_model_missing``: an admin's correction ends the claim at
    once), and only while the upstream id is the one probed (an admin's fix meanwhile is judged by the next
    round); an ``update`` (no ``updated_at``, no admin edit overwritten), and this process's catalog copy dropped
    as any deployment change drops it (the others' within ``LLMHUB_LOOKUP_CACHE_TTL``)."""
    if probe.model_missing is None:
        return
    rows = Deployment.objects.filter(pk=probe.deployment_id, upstream_id=probe.upstream_id)
    if probe.model_missing:
        # Since the first round that found this id missing; an earlier claim on another id is replaced.
        changed = rows.exclude(upstream_model_missing_since__isnull=False, upstream_model_missing_id=probe.upstream_id)
        changed = changed.update(upstream_model_missing_since=at, upstream_model_missing_id=probe.upstream_id)
    else:
        changed = rows.filter(upstream_model_missing_since__isnull=False).update(
            upstream_model_missing_since=None, upstream_model_missing_id=""
        )
    if changed:
        catalog_cache.invalidate()


def _failing_in_a_row(deployment_id: int, count: int) -> bool:
    """Whether the deployment's latest probes failed in ``count`` distinct rounds in a row. A failing probe less
    than ``health_round_seconds()`` older than the newest one of the round counted before belongs to that round:
    two rounds run in the same tick (two beats, a beat and a manual check) are one blip, not two failures."""
    gap = health_round_seconds()
    latest = HealthCheck.objects.filter(deployment_id=deployment_id).order_by("-checked_at", "-pk")
    rounds = 0
    round_start: datetime | None = None
    # Bounded: a burst of manual checks in one round cannot make this read the whole history.
    for ok, checked_at in latest.values_list("ok", "checked_at")[: count * 20]:
        if ok:
            return False
        if round_start is None or checked_at <= round_start - gap:
            rounds += 1
            round_start = checked_at
            if rounds == count:
                return True
    return False


@transaction.atomic
def health_checks_prune(*, now: datetime | None = None) -> int:
    """Drop ``HealthCheck`` rows past the retention (``health_checks_kept``): older than its days, or beyond
    its number of rows of the same deployment. Returns how many went."""
    rows, age = health_checks_kept()
    deleted, _ = HealthCheck.objects.filter(checked_at__lt=(now or timezone.now()) - age).delete()
    crowded = (
        HealthCheck.objects.values("deployment_id")
        .annotate(total=models.Count("pk"))
        .filter(total__gt=rows)
        .values_list("deployment_id", flat=True)
    )
    for deployment_id in crowded:
        latest = HealthCheck.objects.filter(deployment_id=deployment_id).order_by("-checked_at", "-pk")
        oldest_kept = latest.values_list("checked_at", "pk")[rows - 1]
        older = latest.filter(
            models.Q(checked_at__lt=oldest_kept[0]) | models.Q(checked_at=oldest_kept[0], pk__lt=oldest_kept[1])
        )
        deleted += older.delete()[0]
    return deleted
