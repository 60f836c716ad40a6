"""Which variant of a running experiment serves a request: sticky and deterministic.

The unit (``assignment_unit``: the user, else the gateway key; a key's request that names an end user in
``user`` is that end user of that key) and the experiment's salt are hashed into one of ``BUCKETS``
buckets (``experiments.layout.bucket_of``); ``Experiment.layout`` says which variant owns the bucket, or
none (the untouched share). Nothing is stored per user, so a user keeps their variant across requests,
processes and restarts, and everyone is reshuffled only when the salt changes.

Which experiment a model's requests meet:

- a **running** one, between its ``starts_at`` and ``ends_at`` (outside them it assigns nobody);
- a **paused** one assigns nobody: everyone is served as if there were no experiment, and a resume gives
  each user their variant back (the layout is kept);
- a **concluded** one assigns nobody, unless a variant was promoted: then its layout (the winner at 100 %)
  keeps serving the model, with the header and the ledger's experiment columns, until another experiment
  starts on that model. Promoting and then concluding must not snap the traffic back to the old route
  behind the admin's back; to return to it, change the allocation or start another experiment.

When none runs, the newest decision about the model holds: the experiment last started, resumed, paused,
promoted or concluded (``Experiment.decided_at``). A winner's reign ends when another experiment starts;
pausing that one, or concluding it without a winner, leaves the model as routed (that experiment's usual
control and untouched share), never the older winner back behind the admin's back.

The plan of each model is cached in-process (``assignment_cache``; a model without one is cached too),
cleared by ``experiments.signals`` on any change in this process, other processes within
``LLMHUB_LOOKUP_CACHE_TTL``: a request costs no query, only a SHA-256 and a bisect."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db.models import F
from django.utils import timezone

from core.cache import TTLCache

from .layout import bucket_of, layout_owner, layout_starts
from .models import Experiment, ExperimentStatus


@dataclass(frozen=True, slots=True)
class VariantPlan:
    """A variant as assignment needs it (a snapshot: no ORM object on the hot path)."""

    id: int
    name: str
    deployment_id: int | None
    target_model_name: str | None
    prompt_version_id: int | None
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class ExperimentPlan:
    id: int
    name: str
    salt: str
    layout: tuple[tuple[int, int, int], ...]
    variants: dict[int, VariantPlan] = field(hash=False, compare=False)
    starts_at: Any = None
    ends_at: Any = None
    starts: tuple[int, ...] = ()  # the layout's range starts, for the bisect


@dataclass(frozen=True, slots=True)
class Assignment:
    """The variant a request was assigned to. ``header``: the value of ``x-llmhub-experiment``."""

    experiment_id: int
    experiment_name: str
    variant: VariantPlan

    @property
    def variant_id(self) -> int:
        return self.variant.id

    @property
    def header(self) -> str:
        return f"{self.experiment_name}:{self.variant.name}"


assignment_cache: TTLCache[ExperimentPlan | None] = TTLCache("experiments")


def assignment_unit(*, user_id: int | None, api_key_id: int | None, end_user: Any = None) -> str | None:
    """What assignment hashes: the end user a request on a gateway key names (``user``; ``metadata.user_id``
    on /v1/messages: an app serving its own end users through one key), else the user, else the key; None
    when there is none of them."""
    if api_key_id is not None and isinstance(end_user, str) and end_user:
        return f"key:{api_key_id}:user:{end_user}"
    if user_id is not None:
        return f"user:{user_id}"
    if api_key_id is not None:
        return f"key:{api_key_id}"
    return None


def experiment_plan_build(experiment: Experiment) -> ExperimentPlan:
    """The snapshot assignment works from. A concluded experiment (serving its promoted winner) has no
    window: its end has passed, and its layout serves on."""
    layout = tuple((int(a), int(b), int(c)) for a, b, c in experiment.layout or ())
    window = experiment.status == ExperimentStatus.RUNNING
    variants = {
        v.id: VariantPlan(
            id=v.id,
            name=v.name,
            deployment_id=v.deployment_id,
            target_model_name=v.target_model.name if v.target_model_id is not None else None,
            prompt_version_id=v.prompt_version_id,
            overrides=dict(v.overrides or {}),
        )
        for v in experiment.variants.all()
    }
    return ExperimentPlan(
        id=experiment.pk,
        name=experiment.name,
        salt=experiment.salt,
        layout=layout,
        variants=variants,
        starts_at=experiment.starts_at if window else None,
        ends_at=experiment.ends_at if window else None,
        starts=layout_starts(layout),
    )


async def _load_plan(model_id: int) -> ExperimentPlan | None:
    """The model's running experiment; else, when the experiment decided last (``decided_at``) is a
    concluded one with a promoted winner, that one; else None (the model as routed)."""
    experiments = Experiment.objects.filter(model_id=model_id).prefetch_related("variants__target_model")
    experiment = await experiments.filter(status=ExperimentStatus.RUNNING).afirst()
    if experiment is None:
        experiment = await (
            experiments.exclude(status=ExperimentStatus.DRAFT)
            .order_by(F("decided_at").desc(nulls_last=True), "-id")
            .afirst()
        )
        if experiment is None or experiment.status != ExperimentStatus.CONCLUDED:
            return None
        if experiment.promoted_variant_id is None:
            return None
    return experiment_plan_build(experiment)


async def experiment_assign(*, model_id: int, unit: str | None) -> Assignment | None:
    """The variant ``unit`` gets in the experiment on the model ``model_id``, or None (no running experiment
    nor promoted winner, outside its start and end, no unit, or the unit falls in the untouched share).
    No query once the model's plan is cached."""
    if unit is None:
        return None
    plan = await assignment_cache.get_or_load(("model", model_id), lambda: _load_plan(model_id))
    if plan is None:
        return None
    if plan.starts_at is not None or plan.ends_at is not None:
        now = timezone.now()
        if (plan.starts_at is not None and now < plan.starts_at) or (plan.ends_at is not None and now >= plan.ends_at):
            return None
    variant_id = layout_owner(plan.layout, bucket_of(plan.salt, unit), plan.starts)
    variant = plan.variants.get(variant_id) if variant_id is not None else None
    if variant is None:
        return None
    return Assignment(experiment_id=plan.id, experiment_name=plan.name, variant=variant)
