"""Everything that changes an experiment's state or allocation: start, pause, conclude, allocation changes,
the gradual rollout and promotion. Each runs in one transaction with the experiment's row locked
(``select_for_update``), so two admins (or an admin and the rollout task) never interleave, and records
what it did in the audit log (``experiment.start``, ``experiment.allocation``, ``experiment.promote``, …).

Allocations are percents with at most two decimals: 1 % is 100 of the ``BUCKETS`` buckets. The layout (which
buckets each variant owns) only ever changes through ``experiments.layout.layout_rebalance``, so a change
of allocation moves as few users as possible, and a paused experiment resumes with everyone in the variant
they had.

States: draft → running ⇄ paused → concluded. A running experiment assigns; a paused one assigns nobody
(everyone is served as if there were no experiment; the layout is kept for the resume); a concluded one
assigns nobody unless a variant was promoted, whose layout (the winner at 100 % unless changed since) keeps
serving the model's traffic until another experiment starts on that model (see ``experiments.assignment``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.services import audit_record
from core.time_limits import time_limit_reraise
from prompts.rendering import variable_required
from providers.models import CatalogModel, ModelMode

from .layout import layout_rebalance
from .models import AllocationStep, Experiment, ExperimentStatus, Variant

logger = logging.getLogger(__name__)

CENT = Decimal("0.01")
HUNDRED = Decimal(100)


def allocation_percent(value: Any, *, name: str = "allocation") -> Decimal:
    """A percent from a form, JSON or an admin: 0–100 with at most two decimals (the bucket grain)."""
    try:
        percent = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise ValidationError({name: f"{value!r} is not a number."}) from None
    if not percent.is_finite() or not 0 <= percent <= HUNDRED:
        raise ValidationError({name: f"{value} is not a percent between 0 and 100."})
    if percent != percent.quantize(CENT):
        raise ValidationError({name: f"{value}: at most two decimals (1 % is 100 buckets)."})
    return percent.quantize(CENT)


def rollout_steps_check(
    *, steps: Sequence[Mapping[str, Any]], start: Mapping[str, Decimal], field: str = "steps"
) -> None:
    """Rollout steps that can apply: each a non-empty ``{variant name: percent}`` naming only ``start``'s
    variants (every variant with its allocation before the first step), within 100 % alone and once applied
    in order: a step sets the variants it names and leaves the others at the previous step's (or ``start``'s)
    allocation. The REST API and the admin check steps with this when they are saved, rather than when they
    come to apply (a timed step would fail unseen, an advance with an error days later); an edit of a
    running experiment's allocations in between is still checked when the step applies
    (``experiment_allocation_set``). Raises ``ValidationError`` keyed ``<field>.<index>.allocations``."""
    current = dict(start)
    for index, step in enumerate(steps):
        where = f"{field}.{index}.allocations"
        allocations = step.get("allocations")
        if not isinstance(allocations, Mapping):
            raise ValidationError({where: 'A step is {"variant-name": percent, ...}.'})
        unknown = sorted(set(allocations) - set(start))
        if unknown:
            raise ValidationError({where: f"No variant named {', '.join(unknown)}."})
        if not allocations:
            raise ValidationError({where: "A step sets at least one variant."})
        wanted: dict[str, Decimal] = {}
        for name, value in allocations.items():
            try:
                wanted[name] = allocation_percent(value, name=name)
            except ValidationError as exc:
                raise ValidationError({f"{where}.{name}": exc.message_dict[name]}) from None
        total = sum(wanted.values(), Decimal(0))
        if total > HUNDRED:
            raise ValidationError({where: f"The allocations add up to {total} %, more than 100 %."})
        current.update(wanted)
        total = sum(current.values(), Decimal(0))
        if total > HUNDRED:
            raise ValidationError(
                {
                    where: "With the variants this step leaves as they were, the allocations would add up to "
                    f"{total} %, more than 100 %."
                }
            )


def _basis_points(percent: Decimal) -> int:
    return int(percent * 100)


def _allocations_text(variants: Mapping[str, Decimal]) -> dict[str, str]:
    return {name: f"{percent.quantize(CENT)}" for name, percent in variants.items()}


def _locked(experiment: Experiment) -> tuple[Experiment, list[Variant]]:
    locked = Experiment.objects.select_for_update().get(pk=experiment.pk)
    return locked, list(
        Variant.objects.filter(experiment=locked).select_related(
            "deployment__provider", "target_model__alias_of", "prompt_version"
        )
    )


def _layout_of(experiment: Experiment, variants: list[Variant]) -> list[list[int]]:
    """The experiment's layout rebalanced to its variants' allocations (ranges of deleted variants are
    dropped first: their buckets are untouched)."""
    existing = {v.pk for v in variants}
    kept = [list(r) for r in experiment.layout or () if int(r[2]) in existing]
    return layout_rebalance(kept, {v.pk: _basis_points(v.allocation) for v in variants})


def _allocations_apply(
    experiment: Experiment, variants: list[Variant], allocations: Mapping[str, Any]
) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    """Set the named variants' allocations and rebalance the layout (in the caller's transaction, the
    experiment locked). Returns the allocations before and after, by variant name."""
    by_name = {v.name: v for v in variants}
    unknown = sorted(set(allocations) - set(by_name))
    if unknown:
        raise ValidationError({"allocations": f"No variant named {', '.join(unknown)} in {experiment.name}."})
    wanted = {name: allocation_percent(value, name=name) for name, value in allocations.items()}
    before = {v.name: v.allocation for v in variants}
    after = {**before, **wanted}
    total = sum(after.values(), Decimal(0))
    if total > HUNDRED:
        raise ValidationError({"allocations": f"The variants' allocations add up to {total} %, more than 100 %."})
    for name, percent in wanted.items():
        variant = by_name[name]
        if variant.allocation != percent:
            variant.allocation = percent
            variant.save(update_fields=["allocation"])
    experiment.layout = _layout_of(experiment, variants)
    experiment.save(update_fields=["layout", "updated_at"])
    return before, after


@transaction.atomic
def experiment_allocation_set(
    *, experiment: Experiment, allocations: Mapping[str, Any], actor: Any = ..., reason: str = ""
) -> Experiment:
    """Give the variants named in ``allocations`` (``{variant name: percent}``) those percents; the others
    keep theirs. Each 0–100 with at most two decimals, all together at most 100 (the rest is the untouched
    share). The layout moves as few users as possible (``layout_rebalance``): raising one variant from 10 %
    to 20 % takes its new users from the untouched share and moves nobody else. Recorded as
    ``experiment.allocation`` with the allocations before and after and ``reason``."""
    locked, variants = _locked(experiment)
    before, after = _allocations_apply(locked, variants, allocations)
    if before != after:
        audit_record(
            "experiment.allocation",
            target=locked,
            changes={
                "allocation": [_allocations_text(before), _allocations_text(after)],
                **({"reason": [None, reason]} if reason else {}),
            },
            actor=actor,
        )
    return locked


def _required_variables(version: Any) -> set[str]:
    return {item["name"] for item in version.variables or [] if variable_required(item)}


def variants_serving_problems(model: CatalogModel, variants: Sequence[Variant]) -> list[tuple[Variant, str, str]]:
    """The variants (of an experiment on ``model``) that could not serve the callers who fall in them, each with
    the field at fault and why: an output limit among its ``overrides`` past what its model writes at most, or a
    ``prompt_version`` whose required variables are not those of the version it competes with (the control's,
    else the first variant's of that template). Every caller in such a variant would get a 400 naming a field they
    never sent (the pipeline leaves them out of the experiment instead): the admin's save, the REST API's and the
    start refuse it."""
    problems: list[tuple[Variant, str, str]] = []
    for v in variants:
        served = v.target_model if v.target_model_id is not None else model
        served = served.alias_of or served
        limit = served.max_output_tokens
        for name in ("max_tokens", "max_completion_tokens"):
            value = (v.overrides or {}).get(name) if isinstance(v.overrides, dict) else None
            if limit and isinstance(value, int) and value > limit:
                problems.append(
                    (
                        v,
                        "overrides",
                        f"{v.name} sets {name} to {value}, more than its model {served.name} writes at most "
                        f"({limit} tokens): every caller in it would be refused.",
                    )
                )
                break
    versioned = sorted(
        (v for v in variants if v.prompt_version_id is not None), key=lambda v: (not v.is_control, v.position)
    )
    competes: dict[int, Variant] = {}
    for v in versioned:
        version = v.prompt_version
        other = competes.setdefault(version.template_id, v)
        if other is v:
            continue
        theirs, ours = _required_variables(other.prompt_version), _required_variables(version)
        if theirs != ours:
            names = ", ".join(sorted(theirs ^ ours))
            problems.append(
                (
                    v,
                    "prompt_version",
                    f"{v.name} runs version {version.number}, whose required variables differ from those of "
                    f"version {other.prompt_version.number} ({other.name}) in {names}: callers of one would be "
                    "refused by the other.",
                )
            )
    return problems


def _start_problems(experiment: Experiment, variants: list[Variant]) -> dict[str, str]:
    problems: dict[str, str] = {}
    if len(variants) < 2:
        problems["variants"] = "An experiment needs at least two variants."
    controls = [v.name for v in variants if v.is_control]
    if len(controls) != 1:
        problems["is_control"] = f"Exactly one variant must be the control (now {len(controls)})."
    for v in variants:
        if v.deployment_id is not None:
            if v.deployment.model_id != experiment.model_id:
                problems[v.name] = f"Its deployment {v.deployment} is not a deployment of {experiment.model}."
            elif not v.deployment.enabled:
                problems[v.name] = f"Its deployment {v.deployment} is disabled."
            elif not v.deployment.provider.enabled:
                provider = v.deployment.provider
                problems[v.name] = f"Its deployment {v.deployment} is on provider {provider}, which is disabled."
        if v.target_model_id is not None:
            target = v.target_model
            if target.pk == experiment.model_id:
                problems[v.name] = "Its target model is the experiment's own model: leave it empty instead."
            elif target.mode != ModelMode.CHAT:
                problems[v.name] = f"Its target model {target} is not a chat model."
            elif not target.enabled:
                problems[v.name] = f"Its target model {target} is disabled."
            elif not (target.alias_of or target).deployments.filter(enabled=True, provider__enabled=True).exists():
                # The pipeline could not resolve it: every user of the variant would be served as usual.
                problems[v.name] = (
                    f"Its target model {target} has no enabled deployment on an enabled provider: "
                    "nobody could be served by it."
                )
    for v, _field, problem in variants_serving_problems(experiment.model, variants):
        problems.setdefault(v.name, problem)
    if experiment.ends_at is not None and experiment.ends_at <= timezone.now():
        # Running past its end it would assign nobody, and the every-minute task would conclude it.
        problems["ends_at"] = (
            f"{experiment.name} ended at {experiment.ends_at.isoformat()}: move ends_at later or clear it."
        )
    total = sum((v.allocation for v in variants), Decimal(0))
    if total > HUNDRED:
        problems["allocation"] = f"The variants' allocations add up to {total} %, more than 100 %."
    return problems


@transaction.atomic
def experiment_start(*, experiment: Experiment, actor: Any = ...) -> Experiment:
    """Start a draft (or resume a paused) experiment: it assigns from now on. Checks that it has at least two
    variants and exactly one control, that deployment variants are deployments of the experiment's model
    (enabled, on an enabled provider), that target models are other enabled chat models with an enabled
    deployment (a variant nobody could reach would serve everyone as usual, unrecorded), that its ``ends_at``
    has not passed, that the allocations add up to at most 100 %, and that no other experiment runs on the model
    (one running experiment per model: a request is in at most one). Builds the layout from the allocations (a
    resumed experiment keeps its users where they were); sets ``starts_at`` to now when empty. Recorded as
    ``experiment.start``."""
    locked, variants = _locked(experiment)
    if locked.status == ExperimentStatus.RUNNING:
        raise ValidationError({"status": f"{locked.name} is already running."})
    if locked.status == ExperimentStatus.CONCLUDED:
        raise ValidationError({"status": f"{locked.name} is concluded; create a new experiment to test again."})
    problems = _start_problems(locked, variants)
    other = Experiment.objects.filter(model_id=locked.model_id, status=ExperimentStatus.RUNNING).exclude(pk=locked.pk)
    running = other.values_list("name", flat=True).first()
    if running is not None:
        problems["model"] = f"The experiment {running} already runs on {locked.model}: pause or conclude it first."
    if problems:
        raise ValidationError(problems)
    previous = locked.status
    locked.layout = _layout_of(locked, variants)
    locked.status = ExperimentStatus.RUNNING
    now = timezone.now()
    if locked.starts_at is None:
        locked.starts_at = now
    locked.decided_at = now
    try:
        with transaction.atomic():
            locked.save(update_fields=["layout", "status", "starts_at", "decided_at", "updated_at"])
    except IntegrityError:  # another start on the same model committed between the check and the save
        raise ValidationError(
            {"model": f"Another experiment already runs on {locked.model}: pause or conclude it first."}
        ) from None
    audit_record(
        "experiment.start",
        target=locked,
        changes={
            "status": [previous, locked.status],
            "allocation": [None, _allocations_text({v.name: v.allocation for v in variants})],
        },
        actor=actor,
    )
    return locked


@transaction.atomic
def experiment_pause(*, experiment: Experiment, actor: Any = ...) -> Experiment:
    """Stop assigning: everyone is served as if there were no experiment, until it is started again (with
    the same layout: each user gets their variant back). Recorded as ``experiment.pause``."""
    locked, _ = _locked(experiment)
    if locked.status != ExperimentStatus.RUNNING:
        raise ValidationError({"status": f"{locked.name} is {locked.status}, not running."})
    locked.status = ExperimentStatus.PAUSED
    locked.decided_at = timezone.now()
    locked.save(update_fields=["status", "decided_at", "updated_at"])
    audit_record("experiment.pause", target=locked, changes={"status": ["running", "paused"]}, actor=actor)
    return locked


@transaction.atomic
def experiment_conclude(*, experiment: Experiment, actor: Any = ..., now: datetime | None = None) -> Experiment:
    """End the experiment for good: ``ends_at`` becomes now (unless it ended earlier). It assigns nobody any
    more, except that a promoted winner keeps serving the model's traffic (its layout as it is) until
    another experiment starts on that model. Recorded as ``experiment.conclude``."""
    locked, _ = _locked(experiment)
    if locked.status == ExperimentStatus.CONCLUDED:
        raise ValidationError({"status": f"{locked.name} is already concluded."})
    now = now or timezone.now()
    previous = locked.status
    locked.status = ExperimentStatus.CONCLUDED
    if locked.ends_at is None or locked.ends_at > now:
        locked.ends_at = now
    locked.decided_at = timezone.now()
    locked.save(update_fields=["status", "ends_at", "decided_at", "updated_at"])
    audit_record(
        "experiment.conclude",
        target=locked,
        changes={"status": [previous, locked.status], "ends_at": [None, locked.ends_at.isoformat()]},
        actor=actor,
    )
    return locked


def _step_apply(locked: Experiment, variants: list[Variant], step: AllocationStep, actor: Any, how: str) -> None:
    before, after = _allocations_apply(locked, variants, step.allocations or {})
    step.applied_at = timezone.now()
    step.save(update_fields=["applied_at"])
    audit_record(
        "experiment.allocation",
        target=locked,
        changes={
            "allocation": [_allocations_text(before), _allocations_text(after)],
            "rollout_step": [None, step.position],
            "reason": [None, how],
        },
        actor=actor,
    )


def _next_step(experiment: Experiment) -> AllocationStep | None:
    return (
        AllocationStep.objects.select_for_update()
        .filter(experiment=experiment, applied_at__isnull=True)
        .order_by("position", "id")
        .first()
    )


@transaction.atomic
def experiment_rollout_advance(*, experiment: Experiment, actor: Any = ...) -> AllocationStep:
    """Apply the rollout's next step now (the first unapplied ``AllocationStep`` by position, whether or
    not it has a time), as ``experiment_allocation_set`` would; the step is stamped ``applied_at`` and
    recorded as ``experiment.allocation`` with its position. A running or paused experiment only, and not
    once a variant was promoted (the promotion ends the rollout)."""
    locked, variants = _locked(experiment)
    if locked.status not in (ExperimentStatus.RUNNING, ExperimentStatus.PAUSED):
        raise ValidationError({"status": f"{locked.name} is {locked.status}: start it before rolling out."})
    if locked.promoted_variant_id is not None:
        raise ValidationError({"steps": f"{locked.name} has a promoted variant: its rollout is over."})
    step = _next_step(locked)
    if step is None:
        raise ValidationError({"steps": f"{locked.name} has no rollout step left."})
    _step_apply(locked, variants, step, actor, "rollout advanced by hand")
    return step


def rollout_steps_apply_due(*, now: datetime | None = None, failed: list[str] | None = None) -> list[AllocationStep]:
    """Apply the timed rollout steps that are due (``at`` ≤ now) in running experiments without a promoted
    variant, each experiment in its own transaction (a step that no longer fits is logged and left for an
    admin, one that fails otherwise is logged and tried again at the next run, one deleted since the query is
    skipped; the other experiments go on). Steps apply in order: a step without a time waits for an admin
    (``experiment_rollout_advance``) and holds back the timed steps after it, so a rollout can be gated
    ("5 % now, 25 % once I looked, then 50 % and 100 % a day apart"). Several due steps apply one after
    the other, each recorded; a step due after the experiment's ``ends_at`` never applies. Run every minute by
    ``experiments.tasks.rollout_steps_apply_due_task``, which also concludes running experiments whose
    ``ends_at`` has passed. Returns the steps applied; the names of the experiments whose due steps did not apply
    are appended to ``failed``. A step that no longer fits is logged once a day (``ROLLOUT_REFUSED_LOG_EVERY``),
    not at every run."""
    now = now or timezone.now()
    failed = [] if failed is None else failed
    due = (
        AllocationStep.objects.filter(
            applied_at__isnull=True,
            at__lte=now,
            experiment__status=ExperimentStatus.RUNNING,
            experiment__promoted_variant__isnull=True,
        )
        .values_list("experiment_id", "experiment__name")
        .distinct()
    )
    applied: list[AllocationStep] = []
    for experiment_id, name in sorted(set(due)):
        done: list[AllocationStep] = []  # counted once committed: a failure rolls back the experiment's steps
        try:
            with transaction.atomic():
                try:
                    locked, variants = _locked(Experiment(pk=experiment_id))
                except Experiment.DoesNotExist:
                    continue  # deleted since the query
                if locked.status != ExperimentStatus.RUNNING or locked.promoted_variant_id is not None:
                    continue
                # Not past the experiment's end: after a beat outage across it, the steps due after it stay
                # unapplied, as they would have had the task concluded the experiment on time.
                until = now if locked.ends_at is None else min(now, locked.ends_at)
                while (step := _next_step(locked)) is not None and step.at is not None and step.at <= until:
                    _step_apply(locked, variants, step, None, f"rollout step due at {step.at.isoformat()}")
                    done.append(step)
            applied.extend(done)
        except ValidationError as exc:
            failed.append(name)
            reason = "; ".join(exc.messages)
            if _first_report(f"experiments:rollout-refused:{experiment_id}:{reason}"):
                logger.error(
                    "experiment %s (id %s): a due rollout step no longer fits and waits for an admin: %s",
                    name,
                    experiment_id,
                    reason,
                )
        except Exception as exc:
            time_limit_reraise(exc)
            failed.append(name)
            logger.exception(
                "could not apply a due rollout step of the experiment %s (id %s); tried again at the next run",
                name,
                experiment_id,
            )
    return applied


# A due step that no longer fits stays so until an admin changes it: logged again after this long, not every run.
ROLLOUT_REFUSED_LOG_EVERY = timedelta(days=1)


def _first_report(key: str) -> bool:
    """Whether ``key`` was not reported within ``ROLLOUT_REFUSED_LOG_EVERY`` (recorded now, in Django's default
    cache: Redis, shared by every worker, when ``REDIS_URL`` is set; without it each process's own, so once per
    worker process). A cache that cannot answer says yes, at every run while it cannot: a line twice is better
    than none."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        return cache.add(f"experiments:reported:{digest}", True, timeout=int(ROLLOUT_REFUSED_LOG_EVERY.total_seconds()))
    except Exception:
        return True


def experiments_conclude_due(*, now: datetime | None = None, failed: list[str] | None = None) -> list[Experiment]:
    """Conclude the running experiments whose ``ends_at`` has passed (they already assign nobody).

    Each on its own: one an admin (or another run) concluded since the query is skipped, and one that fails
    is logged, its name appended to ``failed``, and tried again at the next run, while the others are concluded
    now."""
    now = now or timezone.now()
    failed = [] if failed is None else failed
    due = Experiment.objects.filter(status=ExperimentStatus.RUNNING, ends_at__lte=now)
    concluded = []
    for pk, name in due.order_by("ends_at", "pk").values_list("pk", "name"):
        try:
            experiment = _experiment_conclude_if_due(pk=pk, now=now)
        except Exception as exc:
            time_limit_reraise(exc)
            failed.append(name)
            logger.exception("could not conclude the experiment %s (id %s) past its end", name, pk)
            continue
        if experiment is not None:
            concluded.append(experiment)
    return concluded


@transaction.atomic
def _experiment_conclude_if_due(*, pk: int, now: datetime) -> Experiment | None:
    locked = Experiment.objects.select_for_update().filter(pk=pk).first()
    if locked is None or locked.status != ExperimentStatus.RUNNING or locked.ends_at is None or locked.ends_at > now:
        return None  # deleted, concluded, paused or given a later end since the query
    return experiment_conclude(experiment=locked, actor=None, now=now)


@transaction.atomic
def experiment_promote(*, experiment: Experiment, variant: Variant, actor: Any = ...) -> Experiment:
    """Make ``variant`` the winner: its allocation becomes 100 %, every other variant's 0 % (so every user of
    the model gets it, the untouched share included), ``promoted_variant`` is set and the rollout's remaining
    steps no longer apply. The experiment keeps its status: running, it goes on recording the winner's
    traffic; concluded (now or later), the winner keeps serving the model until another experiment starts
    on it. Recorded as ``experiment.promote``. Not for a draft (it has served nobody)."""
    locked, variants = _locked(experiment)
    if locked.status == ExperimentStatus.DRAFT:
        raise ValidationError({"status": f"{locked.name} has not started: there is nothing to promote."})
    if variant.experiment_id != locked.pk:
        raise ValidationError({"variant": f"{variant.name} is not a variant of {locked.name}."})
    allocations = {v.name: (HUNDRED if v.pk == variant.pk else Decimal(0)) for v in variants}
    before, after = _allocations_apply(locked, variants, allocations)
    previous = locked.promoted_variant.name if locked.promoted_variant_id is not None else None
    locked.promoted_variant = next(v for v in variants if v.pk == variant.pk)
    locked.decided_at = timezone.now()
    locked.save(update_fields=["promoted_variant", "decided_at", "updated_at"])
    audit_record(
        "experiment.promote",
        target=locked,
        changes={
            "promoted_variant": [previous, variant.name],
            "allocation": [_allocations_text(before), _allocations_text(after)],
        },
        actor=actor,
    )
    return locked
