"""A/B experiments on a public model's traffic, and feedback on requests.

An ``Experiment`` splits the traffic of one public model among its ``Variant``s (a deployment of that
model, another public model, optionally a prompt-template version and parameter overrides), each with an
allocation in percent; what the variants leave is the untouched share, served as if there were no
experiment. Assignment is sticky: ``experiments.layout`` hashes the experiment's salt and the unit (user,
key, or the request's ``user`` field) into one of ``BUCKETS`` buckets, and ``Experiment.layout`` says
which variant owns which bucket ranges; a change of allocation moves only the buckets it must.

``Feedback`` is one rating of one request (thumbs or a score), by the caller who made the request: from
``POST /v1/feedback`` or the chat page's thumbs. Results (``experiments.results``) join it to the ledger
by ``request_id``."""

from __future__ import annotations

import secrets
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from .overrides import overrides_validate

BUCKETS = 10_000  # basis points: an allocation of 12.34 % owns 1,234 buckets


class ExperimentStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    RUNNING = "running", "Running"
    PAUSED = "paused", "Paused"
    CONCLUDED = "concluded", "Concluded"


class Metric(models.TextChoices):
    """What results compare. ``HIGHER_IS_BETTER`` says the direction of each."""

    POSITIVE_RATE = "positive_rate", "Positive-feedback rate"
    MEAN_SCORE = "mean_score", "Mean score"
    ERROR_RATE = "error_rate", "Error rate"
    LATENCY = "latency_ms", "Latency (ms)"
    TTFT = "ttft_ms", "Time to first token (ms)"
    COST = "cost", "Cost per request"
    COST_PER_POSITIVE = "cost_per_positive", "Cost per positive answer"


HIGHER_IS_BETTER = {Metric.POSITIVE_RATE: True, Metric.MEAN_SCORE: True}


def _salt() -> str:
    return secrets.token_hex(8)


class Experiment(models.Model):
    name = models.SlugField(max_length=64, unique=True, help_text="Shown in x-llmhub-experiment: name:variant.")
    description = models.TextField(blank=True)
    model = models.ForeignKey(
        "providers.CatalogModel",
        on_delete=models.PROTECT,
        related_name="experiments",
        help_text="The public model whose traffic the experiment splits.",
    )
    salt = models.CharField(
        max_length=32, default=_salt, help_text="Hashed with the user: a new salt reshuffles everyone."
    )
    status = models.CharField(max_length=16, choices=ExperimentStatus.choices, default=ExperimentStatus.DRAFT)
    starts_at = models.DateTimeField(null=True, blank=True, help_text="Empty: from when it is started.")
    ends_at = models.DateTimeField(null=True, blank=True, help_text="Empty: until it is concluded.")
    primary_metric = models.CharField(max_length=32, choices=Metric.choices, default=Metric.POSITIVE_RATE)
    guardrail_metrics = models.JSONField(
        default=list, blank=True, help_text='Metrics that must not get worse, e.g. ["error_rate", "cost"].'
    )
    alpha = models.DecimalField(
        max_digits=4,
        decimal_places=3,
        default=Decimal("0.05"),
        validators=[MinValueValidator(Decimal("0.001")), MaxValueValidator(Decimal("0.2"))],
        help_text="The error rate the verdicts hold to, however often the results are looked at.",
    )
    # Which variant owns which buckets: [[start, end, variant_id], ...], end exclusive, over BUCKETS buckets;
    # kept by ``experiments.layout.layout_rebalance`` so that a change of allocation moves as few as it can.
    layout = models.JSONField(default=list, blank=True, editable=False)
    promoted_variant = models.ForeignKey(
        "Variant", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    # When it last changed what serves its model: started, resumed, paused, promoted or concluded. Of a model's
    # experiments none of which runs, the one decided last says what serves it (``experiments.assignment``).
    decided_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # One running experiment per model: a request is in at most one experiment.
            models.UniqueConstraint(
                fields=["model"], condition=models.Q(status="running"), name="experiments_one_running_per_model"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Variant(models.Model):
    """One arm. What serves it: ``deployment`` (one deployment of the experiment's model), or
    ``target_model`` (another public model), or neither (the model as routed: the usual control); with
    an optional ``prompt_version`` (for requests that run that version's template) and ``overrides``
    (request parameters such as ``temperature`` set on the way upstream)."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="variants")
    name = models.SlugField(max_length=64)
    is_control = models.BooleanField(default=False)
    deployment = models.ForeignKey(
        "providers.Deployment", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    target_model = models.ForeignKey(
        "providers.CatalogModel", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    prompt_version = models.ForeignKey(
        "prompts.PromptVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    overrides = models.JSONField(default=dict, blank=True, help_text='e.g. {"temperature": 0.2}')
    allocation = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        default=Decimal("0"),
        validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("100"))],
        help_text="Percent of the model's traffic (users) this variant gets.",
    )
    position = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["experiment", "position", "id"]
        constraints = [
            models.UniqueConstraint(fields=["experiment", "name"], name="experiments_variant_name_unique"),
            models.CheckConstraint(
                condition=models.Q(allocation__gte=0, allocation__lte=100), name="experiments_variant_allocation_range"
            ),
            models.CheckConstraint(
                condition=~models.Q(deployment__isnull=False, target_model__isnull=False),
                name="experiments_variant_one_target",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.experiment.name}:{self.name}"

    def clean(self) -> None:
        try:
            overrides_validate(self.overrides)
        except ValidationError as exc:
            problems = "; ".join(f"{name}: {' '.join(messages)}" for name, messages in exc.message_dict.items())
            raise ValidationError({"overrides": problems}) from None


class AllocationStep(models.Model):
    """A step of a gradual rollout: at ``at`` (or when an admin advances the experiment, when ``at`` is
    empty) the allocations become ``allocations`` (``{variant name: percent}``). ``applied_at``: when it was."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="steps")
    position = models.PositiveSmallIntegerField(default=0)
    allocations = models.JSONField(help_text='{"variant-name": "25.00", ...}')
    at = models.DateTimeField(null=True, blank=True, help_text="Empty: when an admin advances the rollout.")
    applied_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["experiment", "position", "id"]

    def __str__(self) -> str:
        return f"{self.experiment.name} step {self.position}"


class FeedbackMetric(models.TextChoices):
    THUMBS = "thumbs", "Thumbs"
    SCORE = "score", "Score"


class FeedbackSource(models.TextChoices):
    API = "api", "POST /v1/feedback"
    CHAT = "chat", "Chat page"


class Feedback(models.Model):
    """One rating of one request, by the caller who made it; one per request and metric, updatable.
    ``value``: +1 / -1 for thumbs, the score otherwise."""

    request_id = models.CharField(max_length=64)
    # The rated request's ledger row, joined on ``request_id`` (unique in the ledger): no column and no
    # constraint, only the join the experiment results read (``experiments/results.py``). A rating may
    # name a row not written yet, or deleted by retention; then the join finds nothing.
    usage = models.ForeignObject(
        "billing.UsageRecord",
        on_delete=models.DO_NOTHING,
        from_fields=["request_id"],
        to_fields=["request_id"],
        related_name="+",
        null=True,
    )
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    metric = models.CharField(max_length=32, default=FeedbackMetric.THUMBS)
    value = models.FloatField()
    comment = models.TextField(blank=True)
    source = models.CharField(max_length=16, choices=FeedbackSource.choices, default=FeedbackSource.API)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["request_id", "metric"], name="experiments_feedback_once_per_metric")
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.metric}={self.value}"
