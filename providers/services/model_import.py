"""Import of a provider's model list into the catalog, as disabled models (one deployment each on that
provider) until an admin prices them; recorded in the audit log as ``provider.import_models``.

Adapter calls are async (the SDK clients are). The sync entry points (admin actions, Celery tasks,
management commands) run them with ``core.async_bridge.run_async`` on a one-shot adapter, closed afterwards:
the pooled adapters of ``adapter_for`` belong to a long-lived loop, and a pooled client created in a
loop that ends right after the call would never be closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.db import transaction

from audit.services import audit_record
from core.async_bridge import run_async

from ..adapters import adapter_class_for_kind
from ..models import CatalogModel, Deployment, Provider
from ..selectors import provider_config
from ..types import ProviderConfig, UpstreamModel

# Model import -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImportResult:
    created: tuple[str, ...]  # public names of the new catalog entries (disabled, unpriced)
    already_known: int  # upstream ids already deployed on this provider
    skipped: tuple[str, ...]  # upstream ids left out because no public name was free for them


async def _list_models_once(config: ProviderConfig) -> list[UpstreamModel]:
    adapter = adapter_class_for_kind(config.kind)(config)
    try:
        return await adapter.list_models()
    finally:
        await adapter.aclose()


def provider_import_models(*, provider: Provider) -> ImportResult:
    """Add the provider's listed models that the catalog does not serve from it yet.

    Each new entry is a disabled public model with one deployment on this provider, priced at zero, so that
    no client can use (and nobody is billed nothing for) a model until an admin has priced and enabled it.
    An upstream id already deployed on this provider, under any public name, is already known. The public
    name is the upstream id, or ``<provider>/<upstream id>`` when another model already has that name.
    Raises ``ProviderError`` when the provider cannot be listed."""
    listed = run_async(_list_models_once, provider_config(provider))
    name_max = CatalogModel._meta.get_field("name").max_length
    upstream_max = Deployment._meta.get_field("upstream_id").max_length
    default_context = CatalogModel._meta.get_field("context_window").get_default()
    upstream_ids = sorted({item.id for item in listed if item.id})
    context_windows = {item.id: item.context_window for item in listed}

    with transaction.atomic():
        known = set(Deployment.objects.filter(provider=provider).values_list("upstream_id", flat=True))
        candidates = [name for uid in upstream_ids for name in (uid, f"{provider.name}/{uid}")]
        taken = set(CatalogModel.objects.filter(name__in=candidates).values_list("name", flat=True))
        new_rows: list[tuple[CatalogModel, str]] = []
        skipped: list[str] = []
        for upstream_id in upstream_ids:
            if upstream_id in known:
                continue
            name = next(
                (
                    name
                    for name in (upstream_id, f"{provider.name}/{upstream_id}")
                    if name not in taken and len(name) <= name_max
                ),
                None,
            )
            if name is None or len(upstream_id) > upstream_max:
                skipped.append(upstream_id)
                continue
            taken.add(name)
            model = CatalogModel(
                name=name, context_window=context_windows.get(upstream_id) or default_context, enabled=False
            )
            new_rows.append((model, upstream_id))
        CatalogModel.objects.bulk_create([model for model, _ in new_rows])
        Deployment.objects.bulk_create(
            Deployment(
                model=model,
                name=provider.name,  # bulk_create skips save(), which would default the name to this
                provider=provider,
                upstream_id=upstream_id,
                input_per_mtok=Decimal("0"),
                output_per_mtok=Decimal("0"),
            )
            for model, upstream_id in new_rows
        )
        if new_rows:  # bulk_create sends no save signals: the catalog's audit trail is written here
            audit_record(
                "provider.import_models",
                target=provider,
                changes={"models": [[], sorted(model.name for model, _ in new_rows)]},
            )
    return ImportResult(
        created=tuple(model.name for model, _ in new_rows),
        already_known=len(known.intersection(upstream_ids)),
        skipped=tuple(skipped),
    )
