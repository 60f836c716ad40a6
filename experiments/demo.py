"""The demo's experiment (``make run``): a brand, the ready-made prompt templates, and a running A/B experiment
on ``demo-gpt-4o-mini`` with three weeks of seeded history, so the results page shows a finished comparison
on a fresh machine.

The experiment splits the model's two deployments on the fake upstream: ``east`` (the control) and ``west``
(the treatment; think of it as a fine-tuned version of the same model at the same price). Its rollout went
10 % → 25 % → 50 % per variant over its first week, started and advanced through ``experiments.services``
as an admin's clicks would (so the layout is theirs: the users who joined at 10 % kept their variant at
50 %).

The history is synthetic and says so: a few hundred demo users (``ab-demo-NNN``, who cannot sign in), each a
separate assignment unit whose every ledger row is in the variant their bucket falls in at that moment
(bucketed with the experiment's salt, exactly as ``experiments.assignment`` would), or outside the
experiment before the rollout reached them. Prices are the deployments' catalog prices (``cost_for``);
thumbs are given on about half the answered requests, positive on exactly 50 % of east's and 62 % of
west's. Everything is drawn from ``numpy.random.default_rng(seed)`` and the salt is derived from the seed,
so the same seed on the same user ids gives the same history (and any user ids the same comparison). The
spend is on the demo users only: no budget of the ``demo`` login or anyone else moves.

Idempotent by the experiment's name: once it exists (whatever an admin has done with it since, concluded or
promoted) nothing is seeded again; ``experiments_demo_remove`` takes it and its history away, so that
``demo_setup --reset-demo-experiment`` can seed it afresh.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.core.exceptions import ValidationError
from django.db import connections, models, router, transaction
from django.utils import timezone

from billing.models import DailyExperimentUsage, Endpoint, Operation, UsageRecord, UsageStatus
from billing.pricing import cost_for
from billing.services.rollups import daily_usage_rebuild, experiment_usage_fold
from prompts.models import BrandProfile, PromptLabel, PromptTemplate
from prompts.services import brand_save, prompt_label_set, prompt_version_create
from providers.models import CatalogModel, Deployment

from .layout import bucket_of, layout_owner
from .models import AllocationStep, Experiment, Feedback, FeedbackSource, Metric, Variant
from .services import experiment_rollout_advance, experiment_start

EXPERIMENT_NAME = "demo-mini-east-vs-west"
MODEL_NAME = "demo-gpt-4o-mini"
CONTROL, TREATMENT = "east", "west"
BRAND_SLUG = "fernhill-coffee"
USER_PREFIX = "ab-demo-"
USERS = 480
REQUESTS = 5_000
DAYS = 21
# The rollout: days after the start, percent per variant.
ROLLOUT = ((0, 10), (4, 25), (7, 50))
# The rates the history is drawn at (None: a request outside the experiment). Each arm's share of positive
# thumbs is exactly its rate (stratified: which rated requests are positive is drawn, not how many), so the
# comparison does not hang on which users the salt happens to put where (their ids differ from one database
# to the next, and so does the split); west is also a little more concise, so no guardrail can turn against it
# by chance.
POSITIVE_RATE = {CONTROL: 0.50, TREATMENT: 0.62, None: 0.52}
ERROR_RATE = {CONTROL: 0.018, TREATMENT: 0.012, None: 0.016}
COMPLETION_SCALE = {CONTROL: 1.0, TREATMENT: 0.94, None: 1.0}
THUMBS_SHARE = 0.55  # of the answered requests, how many got thumbs
SCORE_SHARE = 0.12  # and a 1-5 score
SCORES = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
SCORE_WEIGHTS = {
    CONTROL: [0.08, 0.14, 0.26, 0.32, 0.20],
    TREATMENT: [0.05, 0.09, 0.22, 0.36, 0.28],
    None: [0.08, 0.14, 0.26, 0.32, 0.20],
}
COMMENTS_UP = ["Spot on, thanks.", "Exactly the tone we wanted.", "Used it as is.", "Short and clear."]
COMMENTS_DOWN = ["Too generic.", "Missed the point of the question.", "Too long.", "Made up a product name."]
ERROR_TYPES = ["upstream_timeout", "upstream_unavailable", "upstream_rate_limited"]

DEMO_BRAND: dict[str, Any] = {
    "name": "Fernhill Coffee Roasters",
    "voice": "A neighbourhood roaster who knows every farm by name: knowledgeable, never snobbish.",
    "tone": "warm, plain-spoken, a little playful; confident without being pushy",
    "audience": "Home brewers aged 25-45 who buy beans online every few weeks, and the small cafés "
    "that stock Fernhill in their grinders.",
    "style_rules": "\n".join(
        [
            "Name the origin and the roast date; specifics beat adjectives.",
            "One exclamation mark per piece at most.",
            "Write 'coffee', not 'java' or 'brew juice'.",
            "Prices in euros with the € sign before the number.",
            "End with one clear next step.",
        ]
    ),
    "words_to_avoid": ["artisanal", "world-class", "game-changer", "revolutionary", "cheap"],
    "example_copy": "This week's roast: Kiambu AA from Kenya, roasted on Tuesday. Blackcurrant up front, "
    "a finish like brown sugar. €14 for 250 g, at the door by Friday.",
}
# The ad copy's second version (labelled ``staging``): a system message that leads with the product.
AD_COPY_V2_SYSTEM = (
    "You write paid ads that lead with one concrete product fact (origin, roast date, price) in the "
    "headline and put the benefit in the description. Never exceed the platform's limits."
)
AD_COPY_V2_NOTE = "staging: lead with one concrete product fact in the headline"


@dataclass(frozen=True)
class DemoResult:
    experiment: Experiment
    seeded: bool  # False: it was there already, and nothing was seeded
    problem: str = ""  # why it could not start (it is then a draft without history)


def experiments_demo_install(*, now: datetime | None = None, seed: int = 12) -> Experiment:
    """The demo brand, the ready-made templates (and a ``staging`` second version of the ad copy), and the
    demo experiment with its history; what is already there is left as it is. Returns the experiment."""
    return experiments_demo_ensure(now=now, seed=seed).experiment


@transaction.atomic
def experiments_demo_ensure(*, now: datetime | None = None, seed: int = 12) -> DemoResult:
    """``experiments_demo_install``, saying whether it seeded the experiment now."""
    demo_brand_ensure()
    demo_templates_ensure()
    existing = Experiment.objects.filter(name=EXPERIMENT_NAME).first()
    if existing is not None:
        return DemoResult(existing, seeded=False)
    experiment, problem = _experiment_seed(now=now or timezone.now(), seed=seed)
    return DemoResult(experiment, seeded=not problem, problem=problem)


def demo_brand_ensure() -> BrandProfile:
    """The demo brand, created once (an admin's edits to it are kept)."""
    brand = BrandProfile.objects.filter(slug=BRAND_SLUG).first()
    if brand is not None:
        return brand
    return brand_save(brand=BrandProfile(slug=BRAND_SLUG, **DEMO_BRAND), actor=None)


def demo_templates_ensure() -> None:
    """The ready-made templates, and a second version of the ad copy that ``staging`` points at."""
    from prompts.kinds import prompt_kinds_install

    prompt_kinds_install()
    template = PromptTemplate.objects.filter(kind="ad_copy").order_by("slug").first()
    if template is None or PromptLabel.objects.filter(template=template, name="staging").exists():
        return
    first = template.versions.order_by("number").first()
    if first is None:
        return
    messages = [
        {**message, "content": f"{message['content']}\n\n{AD_COPY_V2_SYSTEM}"}
        if message.get("role") == "system"
        else dict(message)
        for message in first.messages
    ]
    version = prompt_version_create(
        template=template,
        messages=messages,
        variables=first.variables,
        output_schema=first.output_schema,
        field_limits=first.field_limits,
        note=AD_COPY_V2_NOTE,
    )
    prompt_label_set(template=template, name="staging", version=version, actor=None)


def experiments_demo_remove() -> int:
    """Delete the demo experiment, its seeded history (the demo users' ledger rows and feedback, and the
    users) and rebuild the rollups of the days it covered. Returns how many ledger rows went."""
    with transaction.atomic():
        users = get_user_model().objects.filter(username__startswith=USER_PREFIX)
        rows = UsageRecord.objects.filter(user_id__in=list(users.values_list("pk", flat=True)))
        days = {stamp.date() for stamp in rows.values_list("created_at", flat=True)}
        # In Python, not as a subquery: PostgreSQL plans the nested IN over unanalysed fresh rows as minutes of
        # nested loops.
        request_ids = list(rows.values_list("request_id", flat=True))
        for chunk in range(0, len(request_ids), 500):
            Feedback.objects.filter(request_id__in=request_ids[chunk : chunk + 500]).delete()
        removed, _ = rows.delete()
        demo = Experiment.objects.filter(name=EXPERIMENT_NAME)
        DailyExperimentUsage.objects.filter(experiment_id__in=list(demo.values_list("pk", flat=True))).delete()
        demo.delete()
        users.delete()
        for day in sorted(days):
            daily_usage_rebuild(day=day)
    return removed


def _experiment_seed(*, now: datetime, seed: int) -> tuple[Experiment, str]:
    """Create the experiment and run its rollout through the services an admin's clicks run (start, then
    each step), so its layout is the one they build; then write the history those layouts imply. Returns the
    experiment and, when it could not start, why."""
    model = CatalogModel.objects.get(name=MODEL_NAME)
    deployments = {row.name: row for row in Deployment.objects.filter(model=model).select_related("provider")}
    start = (now - timedelta(days=DAYS)).replace(minute=0, second=0, microsecond=0)
    experiment = Experiment.objects.create(
        name=EXPERIMENT_NAME,
        description=(
            "Demo (seeded history): does the west deployment of demo-gpt-4o-mini, think of it as a fine-tuned "
            "version at the same price that answers a little more concisely, get more thumbs up than east? "
            "Rolled out 10 % → 25 % → 50 % per variant over the first week."
        ),
        model=model,
        salt=f"demo-{seed}",
        starts_at=start,
        primary_metric=Metric.POSITIVE_RATE,
        guardrail_metrics=[Metric.ERROR_RATE.value, Metric.LATENCY.value, Metric.COST.value],
        alpha=Decimal("0.05"),
    )
    (_, first_percent), *later = ROLLOUT
    variants = {
        name: Variant.objects.create(
            experiment=experiment,
            name=name,
            is_control=name == CONTROL,
            deployment=deployments[name],
            allocation=Decimal(first_percent),
            position=position,
        )
        for position, name in enumerate((CONTROL, TREATMENT))
    }
    steps = [
        AllocationStep.objects.create(
            experiment=experiment,
            position=position,
            allocations={name: f"{percent:.2f}" for name in variants},
            at=start + timedelta(days=day),
        )
        for position, (day, percent) in enumerate(later, start=1)
    ]
    try:
        experiment = experiment_start(experiment=experiment, actor=None)
    except ValidationError as exc:
        # Say another experiment already runs on the model (one per model), or an admin disabled a deployment:
        # the demo's stays a draft without history (it never ran) rather than stop theirs or fail `make run`.
        return experiment, " ".join(exc.messages)
    layouts = [list(experiment.layout)]
    for step in steps:
        experiment_rollout_advance(experiment=experiment, actor=None)
        experiment.refresh_from_db(fields=["layout"])
        layouts.append(list(experiment.layout))
        # Applied when it was due, in the history this seeds.
        AllocationStep.objects.filter(pk=step.pk).update(applied_at=step.at)
    experiment.refresh_from_db()
    _history_seed(
        experiment=experiment,
        variants=variants,
        names={variant.pk: name for name, variant in variants.items()},
        layouts=layouts,
        deployments=deployments,
        start=start,
        now=now,
        rng=np.random.default_rng(seed),
    )
    return experiment, ""


def _history_seed(
    *,
    experiment: Experiment,
    variants: dict[str, Variant],
    names: dict[int, str],
    layouts: list[list[list[int]]],
    deployments: dict[str, Deployment],
    start: datetime,
    now: datetime,
    rng: np.random.Generator,
) -> None:
    user_model = get_user_model()
    unusable = make_password(None)
    wanted = [f"{USER_PREFIX}{number:03d}" for number in range(1, USERS + 1)]
    present = set(user_model.objects.filter(username__in=wanted).values_list("username", flat=True))
    user_model.objects.bulk_create(
        [
            user_model(username=name, email=f"{name}@demo.invalid", password=unusable)
            for name in wanted
            if name not in present
        ]
    )
    users = list(user_model.objects.filter(username__in=wanted).order_by("username"))
    buckets = [bucket_of(experiment.salt, f"user:{user.pk}") for user in users]

    # Who sends how much: a few heavy users, many occasional ones.
    activity = rng.lognormal(0.0, 0.9, len(users))
    who = rng.choice(len(users), size=REQUESTS, p=activity / activity.sum())
    span = (now - timedelta(minutes=10) - start).total_seconds()
    when = np.sort(rng.uniform(0.0, span, REQUESTS))
    step_starts = [day * 86_400 for day, _ in ROLLOUT]
    prompt_tokens = np.maximum(12, rng.lognormal(np.log(420), 0.6, REQUESTS)).astype(int)
    completion_base = rng.lognormal(np.log(260), 0.5, REQUESTS)
    cached_share = np.where(rng.random(REQUESTS) < 0.2, rng.uniform(0.3, 0.9, REQUESTS), 0.0)
    websocket = rng.random(REQUESTS) < 0.4
    stream = websocket | (rng.random(REQUESTS) < 0.5)
    failure = rng.random(REQUESTS)
    speed = rng.lognormal(np.log(7.0), 0.25, REQUESTS)  # ms per output token
    ttft = rng.lognormal(np.log(330), 0.35, REQUESTS)
    overhead = rng.integers(4, 30, REQUESTS)
    error_choice = rng.integers(0, len(ERROR_TYPES), REQUESTS)
    weighted_choice = rng.random(REQUESTS)
    weights = {name: row.weight for name, row in deployments.items()}
    east_share = weights[CONTROL] / (weights[CONTROL] + weights[TREATMENT])
    request_ids = [uuid.UUID(bytes=rng.bytes(16), version=4).hex for _ in range(REQUESTS)]

    records: list[UsageRecord] = []
    arms: list[str | None] = []
    for i in range(REQUESTS):
        offset = float(when[i])
        step = max(k for k, begin in enumerate(step_starts) if begin <= offset)
        owner = layout_owner(layouts[step], buckets[who[i]])
        arm = names.get(owner) if owner is not None else None
        served = arm or (CONTROL if weighted_choice[i] < east_share else TREATMENT)
        deployment = deployments[served]
        failed = failure[i] < ERROR_RATE[arm]
        prompt = int(prompt_tokens[i])
        completion = 0 if failed else max(1, int(completion_base[i] * COMPLETION_SCALE[arm]))
        cached = 0 if failed else int(prompt * cached_share[i])
        if failed:
            prompt = 0
            latency = 30_000 if ERROR_TYPES[error_choice[i]] == "upstream_timeout" else int(ttft[i] * 0.6)
        else:
            latency = int(ttft[i] + completion * speed[i])
        records.append(
            UsageRecord(
                request_id=f"req_{request_ids[i]}",
                user=users[who[i]],
                provider=deployment.provider,
                model=deployment.model,
                deployment=deployment,
                provider_name=deployment.provider.name,
                model_name=MODEL_NAME,
                deployment_name=deployment.name,
                attempts=2 if failed else 1,
                endpoint=Endpoint.WEBSOCKET if websocket[i] else Endpoint.REST,
                operation=Operation.CHAT,
                stream=bool(stream[i]),
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                cost=cost_for(
                    model=deployment, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached
                ),
                upstream_latency_ms=latency,
                ttft_ms=int(ttft[i]) if stream[i] and not failed else None,
                duration_ms=latency + int(overhead[i]),
                status=UsageStatus.UPSTREAM_ERROR if failed else UsageStatus.OK,
                error_type=ERROR_TYPES[error_choice[i]] if failed else "",
                experiment_id=experiment.pk if arm is not None else None,
                experiment_variant_id=variants[arm].pk if arm is not None else None,
                created_at=start + timedelta(seconds=offset),
            )
        )
        arms.append(arm)
    _insert_as_given(UsageRecord, records)
    _feedback_seed(records=records, arms=arms, rng=rng, now=now)
    first_day = start.astimezone(UTC).date()
    for offset in range((now.astimezone(UTC).date() - first_day).days + 1):
        daily_usage_rebuild(day=first_day + timedelta(days=offset))
    experiment_usage_fold()


def _feedback_seed(
    *, records: list[UsageRecord], arms: list[str | None], rng: np.random.Generator, now: datetime
) -> None:
    """Thumbs on a share of the answered requests (the positive rate per arm as ``POSITIVE_RATE``), a
    1-5 score on a smaller share, a comment on a few; each a few minutes after its request."""
    n = len(records)
    thumbs_draw, score_draw, comment_draw = (rng.random(n) for _ in range(3))
    delay = rng.exponential(240.0, n)
    rated: dict[str | None, list[int]] = {}
    for i, (record, arm) in enumerate(zip(records, arms, strict=True)):
        if record.status == UsageStatus.OK and thumbs_draw[i] < THUMBS_SHARE:
            rated.setdefault(arm, []).append(i)
    positive: set[int] = set()
    for arm, indices in rated.items():
        chosen = rng.permutation(len(indices))[: round(POSITIVE_RATE[arm] * len(indices))]
        positive.update(indices[k] for k in chosen)
    feedback: list[Feedback] = []
    for i, (record, arm) in enumerate(zip(records, arms, strict=True)):
        if record.status != UsageStatus.OK:
            continue
        at = min(record.created_at + timedelta(seconds=float(delay[i])), now)
        source = FeedbackSource.CHAT if record.endpoint == Endpoint.WEBSOCKET else FeedbackSource.API
        if thumbs_draw[i] < THUMBS_SHARE:
            up = i in positive
            comment = ""
            if comment_draw[i] < 0.08:
                choices = COMMENTS_UP if up else COMMENTS_DOWN
                comment = choices[int(comment_draw[i] * 1000) % len(choices)]
            feedback.append(
                Feedback(
                    request_id=record.request_id,
                    user=record.user,
                    metric="thumbs",
                    value=1.0 if up else -1.0,
                    comment=comment,
                    source=source,
                    created_at=at,
                    updated_at=at,
                )
            )
        if score_draw[i] < SCORE_SHARE:
            score = float(rng.choice(SCORES, p=SCORE_WEIGHTS[arm]))
            feedback.append(
                Feedback(
                    request_id=record.request_id,
                    user=record.user,
                    metric="score",
                    value=score,
                    source=source,
                    created_at=at,
                    updated_at=at,
                )
            )
    _insert_as_given(Feedback, feedback)


def _insert_as_given(model: type[models.Model], rows: Sequence[models.Model]) -> None:
    """Insert ``rows`` as they are, in one prepared statement (``executemany``), each field converted for the
    database as ``save`` would. ``bulk_create`` would stamp ``Feedback``'s times now (auto_now_add; putting them
    back with ``bulk_update`` took seconds), and on SQLite it sends 31 ledger rows per statement (999
    parameters): the history took 8 s to write that way, which every ``make run`` on a fresh database and
    every demo-setup test would pay."""
    database = connections[router.db_for_write(model)]  # the connection itself, not the per-thread proxy
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]
    table = database.ops.quote_name(model._meta.db_table)
    columns = ", ".join(database.ops.quote_name(f.column) for f in fields)
    marks = ", ".join(["%s"] * len(fields))
    values = [[f.get_db_prep_save(getattr(row, f.attname), database) for f in fields] for row in rows]
    with database.cursor() as cursor:
        # Only quoted names from the model's own meta are formatted in; every value is a parameter.
        cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", values)  # noqa: S608
