"""What an experiment is made of, as the REST API changes it: create one with its variants and rollout
steps, edit it, delete it. (Its state and allocations change through ``experiments.services``.)

Once an experiment has started, what serves each variant is fixed: a user's results would otherwise mix
two treatments under one name. Its allocations still change, through ``experiment_allocation_set``, which
moves as few users as it can and records the change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from audit.services import audit_record

from .layout import layout_rebalance
from .models import AllocationStep, Experiment, ExperimentStatus, Variant
from .services import experiment_allocation_set, variants_serving_problems

# What serves a variant: fixed once the experiment has started.
VARIANT_TARGET_FIELDS = ("deployment", "target_model", "prompt_version", "overrides", "is_control")
EXPERIMENT_FIELDS = ("name", "description", "starts_at", "ends_at", "primary_metric", "guardrail_metrics", "alpha")
# Settled when it starts (as in the admin): the name is in the headers clients saw; choosing the metric or
# the error rate after looking at the results would void the verdicts' guarantee.
EXPERIMENT_FIXED_ONCE_STARTED = ("name", "primary_metric", "guardrail_metrics", "alpha", "starts_at")


def _text(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    return str(value)


def _serving_check(experiment: Experiment, given: Sequence[Mapping[str, Any]]) -> None:
    """``variants_serving_problems`` as a ``ValidationError`` naming the variant's field as the request gave it
    (``variants.<index>.<field>``); the transaction it runs in then writes nothing."""
    variants = list(experiment.variants.select_related("target_model__alias_of", "prompt_version"))
    index = {data.get("name"): position for position, data in enumerate(given)}
    problems = variants_serving_problems(experiment.model, variants)
    if problems:
        raise ValidationError(
            {
                (f"variants.{index[v.name]}.{field}" if v.name in index else "variants"): problem
                for v, field, problem in problems
            }
        )


def _steps_replace(experiment: Experiment, steps: Sequence[Mapping[str, Any]]) -> None:
    applied = AllocationStep.objects.filter(experiment=experiment, applied_at__isnull=False)
    AllocationStep.objects.filter(experiment=experiment, applied_at__isnull=True).delete()
    start = (max(applied.values_list("position", flat=True), default=-1)) + 1
    AllocationStep.objects.bulk_create(
        AllocationStep(
            experiment=experiment,
            position=start + index,
            allocations={name: f"{percent}" for name, percent in step["allocations"].items()},
            at=step.get("at"),
        )
        for index, step in enumerate(steps)
    )


@transaction.atomic
def experiment_create(
    *,
    name: str,
    model: Any,
    variants: Sequence[Mapping[str, Any]],
    steps: Sequence[Mapping[str, Any]] = (),
    actor: Any = ...,
    **fields: Any,
) -> Experiment:
    """A draft experiment on ``model`` with its variants (in the order given) and rollout steps; its layout
    is built from the allocations. Recorded as ``experiment.create``."""
    experiment = Experiment.objects.create(name=name, model=model, **fields)
    made = [
        Variant.objects.create(experiment=experiment, position=position, **dict(variant))
        for position, variant in enumerate(variants)
    ]
    _serving_check(experiment, variants)
    experiment.layout = layout_rebalance([], {v.pk: int(v.allocation * 100) for v in made})
    experiment.save(update_fields=["layout"])
    _steps_replace(experiment, steps)
    audit_record(
        "experiment.create",
        target=experiment,
        changes={
            "model": [None, model.name],
            "variants": [None, {v.name: f"{v.allocation}" for v in made}],
            **({"steps": [None, len(steps)]} if steps else {}),
        },
        actor=actor,
    )
    return experiment


def _variant_changes(variant: Variant, data: Mapping[str, Any], where: str, started: bool) -> dict[str, list]:
    changes = {}
    for field in VARIANT_TARGET_FIELDS:
        if field not in data:
            continue
        old = getattr(variant, field)
        new = data[field]
        if old != new:
            if started:
                raise ValidationError(
                    {
                        f"{where}.{field}": f"{variant.name} cannot be retargeted once the experiment has started: "
                        "create a new experiment to test something else."
                    }
                )
            changes[field] = [_text(old), _text(new)]
            setattr(variant, field, new)
    if variant.deployment_id is not None and variant.target_model_id is not None:
        # What the request left out stays: a new target model next to the deployment it had (or the reverse).
        given = "target_model" if "target_model" in data else "deployment"
        other = "deployment" if given == "target_model" else "target_model"
        raise ValidationError(
            {
                f"{where}.{given}": f"{variant.name} would be served by a deployment and by another model: "
                f"a variant has one or the other, so set {other} to null in the same change."
            }
        )
    return changes


@transaction.atomic
def experiment_update(
    *,
    experiment: Experiment,
    fields: Mapping[str, Any],
    variants: Sequence[Mapping[str, Any]] | None = None,
    steps: Sequence[Mapping[str, Any]] | None = None,
    actor: Any = ...,
) -> Experiment:
    """Change the experiment's own ``fields``; ``variants`` by name (a draft's may change anything and gain
    new ones; a started experiment's only their ``allocation``, through ``experiment_allocation_set``);
    ``steps`` replace the rollout steps not yet applied. Recorded as ``experiment.change`` (and
    ``experiment.allocation`` for allocations)."""
    experiment = Experiment.objects.select_for_update().get(pk=experiment.pk)
    started = experiment.status != ExperimentStatus.DRAFT
    changes: dict[str, list] = {}
    if started:
        for field in EXPERIMENT_FIXED_ONCE_STARTED:
            if field in fields and fields[field] != getattr(experiment, field):
                raise ValidationError(
                    {field: f"{experiment.name} has started: its {field} is settled (create a new experiment)."}
                )
    for field in EXPERIMENT_FIELDS:
        if field in fields and getattr(experiment, field) != fields[field]:
            changes[field] = [_text(getattr(experiment, field)), _text(fields[field])]
            setattr(experiment, field, fields[field])
    if changes:
        experiment.save()

    allocations: dict[str, Decimal] = {}
    if variants is not None:
        existing = {v.name: v for v in experiment.variants.all()}
        position = max((v.position for v in existing.values()), default=-1) + 1
        for index, data in enumerate(variants):
            where = f"variants.{index}"
            name = data.get("name")
            if not name:
                raise ValidationError({f"{where}.name": "Name the variant to change or add."})
            variant = existing.get(name)
            if variant is None:
                if started:
                    raise ValidationError(
                        {f"{where}.name": f"No variant named {name!r}; variants are added to a draft only."}
                    )
                variant = Variant.objects.create(
                    experiment=experiment,
                    position=position,
                    **{k: v for k, v in data.items() if k != "allocation"},
                )
                position += 1
                existing[name] = variant
                changes[f"variant {name}"] = [None, "added"]
            else:
                found = _variant_changes(variant, data, where, started)
                if found:
                    variant.save()
                    changes.update({f"variant {name}.{field}": change for field, change in found.items()})
            if "allocation" in data:
                allocations[name] = data["allocation"]
        if not started:  # a started experiment's variants are fixed: its start checked them
            _serving_check(experiment, variants)
    if allocations:
        experiment = experiment_allocation_set(
            experiment=experiment, allocations=allocations, actor=actor, reason="changed over the REST API"
        )
    if steps is not None:
        _steps_replace(experiment, steps)
        changes["steps"] = [None, len(steps)]
    if changes:
        audit_record("experiment.change", target=experiment, changes=changes, actor=actor)
    experiment.refresh_from_db()
    return experiment


@transaction.atomic
def experiment_delete(*, experiment: Experiment, actor: Any = ...) -> None:
    """Delete a draft or concluded experiment (its ledger rows keep its ids). A running or paused one is
    concluded first: deleting it would drop its users out of their variants unrecorded."""
    if experiment.status in (ExperimentStatus.RUNNING, ExperimentStatus.PAUSED):
        raise ValidationError({"status": f"{experiment.name} is {experiment.status}: conclude it before deleting it."})
    audit_record("experiment.delete", target=experiment, changes={"name": [experiment.name, None]}, actor=actor)
    experiment.delete()
