from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, validate_email
from django.db import models
from django.db.models.functions import Now
from django.utils import timezone

from core.outbox import delivery_field
from providers.fields import EncryptedUrlField, UnreadableSecretUrl
from providers.models import CatalogModel
from providers.validators import validate_provider_url


class BudgetPeriod(models.TextChoices):
    DAILY = "daily", "Daily (UTC day)"
    MONTHLY = "monthly", "Monthly (UTC calendar month)"
    TOTAL = "total", "Total (never resets)"


class KeyScope(models.TextChoices):
    """Rights a key holds beyond calling models. None by default."""

    KEYS_MANAGE = "keys:manage", "Manage keys (create child keys, list and revoke its own subtree)"
    # Without it a key reaches only the conversations started by itself or by the keys created under it
    # (``chat.selectors.ConversationReach``).
    CONVERSATIONS = "conversations:manage", "Read and manage all of the owner's conversations"
    # Without it a key reads only its own subtree's ledger rows (``billing.apis``, ``usage_record_list``).
    USAGE_READ = "usage:read", "Read all of the owner's usage"
    # Without it no key reads the audit log, whoever owns it; with it, only while its owner is staff
    # (``audit.apis``).
    AUDIT_READ = "audit:read", "Read the audit log"
    # Without it no key manages experiments or reads their results, whoever owns it; with it, only while its
    # owner's role may (``accounts.permissions.EXPERIMENT_MANAGEMENT``).
    EXPERIMENTS_MANAGE = "experiments:manage", "Manage experiments and read their results"


class ApiKey(models.Model):
    """A gateway key. Only a SHA-256 of the secret is kept; the secret is shown once, at creation.

    A key created by another key (``parent``) never has more than its parent: a budget no larger in the
    same period, no longer lifetime, a subset of its models, rate limits and scopes. It works only while
    every key above it works, and its spend and requests count against every key above it too."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, default="default")
    prefix = models.CharField(max_length=32, unique=True, editable=False, help_text="The visible start of the key.")
    secret_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    allowed_models = models.ManyToManyField(
        "providers.CatalogModel", blank=True, related_name="+", help_text="Empty: every model the owner's plan allows."
    )
    # Limits of this key on top of its owner's plan; empty means the key adds no limit of its own.
    budget_usd = models.DecimalField(
        "budget (USD)", max_digits=14, decimal_places=4, null=True, blank=True, validators=[MinValueValidator(0)]
    )
    budget_period = models.CharField(max_length=8, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTHLY)
    rpm = models.PositiveIntegerField("requests per minute", null=True, blank=True)
    tpm = models.PositiveIntegerField("tokens per minute", null=True, blank=True)
    # A list of ``KeyScope`` values rather than one boolean per right: a new right is a new choice, not a
    # migration, and "a child's scopes are a subset of its parent's" stays one set comparison.
    scopes = models.JSONField(default=list, blank=True, help_text="Rights beyond calling models; empty: none.")
    # CASCADE: a child exists only under its parent, so deleting a key deletes the keys it created. The ledger
    # keeps their rows: the key above that stays gets them (its budget keeps counting their spend), else the key is
    # emptied (services.keys.api_keys_delete, docs/ledger.md "A deleted key's spend").
    # Rotation: the secret before the newest keeps working until ``previous_secret_expires_at`` (a grace
    # period for clients to switch), then stops everywhere within the key cache's TTL.
    previous_secret_hash = models.CharField(max_length=64, null=True, blank=True, unique=True, editable=False)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    rotated_at = models.DateTimeField(null=True, blank=True, editable=False)
    parent = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="children",
        editable=False,
        help_text="The key that created this one; empty for keys created by a person.",
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > timezone.now())


class ApiKeyHeir(models.Model):
    """A key deleted under a key that stayed, and that key, its heir (``services.keys._spend_moved_up``, in the
    delete's transaction): a ledger row naming the deleted key that is written later (a stream that ran on it while it
    was deleted, a row that waited in the spool) is written on the heir, as the key's earlier rows were moved to it
    (``ledger_rows._without_dangling_references``). When the heir is deleted in turn under a key that stays, its
    heirs' rows here name that key: a row is one lookup whatever the chain. No foreign keys: the deleted key is gone,
    and an heir deleted with no key left above it (a whole tree) leaves the row without a key, as its own rows.
    docs/ledger.md, "A deleted key's spend"."""

    deleted_key_id = models.BigIntegerField(primary_key=True, help_text="The deleted key's id.")
    heir_key_id = models.BigIntegerField(db_index=True, help_text="The key its late rows are written on.")
    deleted_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"key #{self.deleted_key_id} -> #{self.heir_key_id}"


class Endpoint(models.TextChoices):
    REST = "rest", "REST"
    WEBSOCKET = "websocket", "WebSocket"


class Operation(models.TextChoices):
    """What the request asked for, whatever transport it came over (``Endpoint``)."""

    CHAT = "chat", "Chat completion"
    MESSAGES = "messages", "Anthropic messages"
    EMBEDDINGS = "embeddings", "Embeddings"
    RESPONSES = "responses", "OpenAI responses"
    COMPLETIONS = "completions", "Text completions"


class UsageStatus(models.TextChoices):
    OK = "ok", "OK"
    CLIENT_DISCONNECTED = "client_disconnected", "Client disconnected"
    CANCELLED = "cancelled", "Cancelled"
    UPSTREAM_ERROR = "upstream_error", "Upstream error"
    # Failed after admission through the request's own fault, not the provider's: refused as invalid by the
    # provider (a 400), by a translation before any call, or by moderation of the reply, or the user's own
    # provider key refused or out of quota. Not held against the provider (the error-rate alert, the ops
    # dashboard, its breaker); still an error of an experiment's variant.
    INVALID = "invalid", "Refused as invalid (by the provider, a translation or moderation)"
    REJECTED = "rejected", "Rejected"
    # The server stopped (graceful shutdown) while the reply was streaming; the client got an in-band error.
    SERVER_SHUTDOWN = "server_shutdown", "Server shut down"
    # The process that admitted the request died before settling it; written by reconcile from its reservation.
    LOST = "lost", "Lost (process died)"


class BillingSource(models.TextChoices):
    PLATFORM = "platform", "Platform key"
    USER_KEY = "user_key", "User's own key"


class UsageRecord(models.Model):
    """The ledger: one row per request, the source of truth for spend."""

    request_id = models.CharField(max_length=64, unique=True)
    # No index of their own: ``(user, created_at)`` and ``(api_key, created_at)`` below serve every lookup by
    # either alone (the leftmost column), the SET NULL of a deleted user or key, and PostgreSQL's foreign-key
    # checks. Two fewer btrees written by every insert: a quarter less CPU a row on SQLite (docs/ledger.md).
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+", db_index=False
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage", db_index=False
    )
    provider = models.ForeignKey("providers.Provider", null=True, on_delete=models.SET_NULL, related_name="+")
    model = models.ForeignKey("providers.CatalogModel", null=True, on_delete=models.SET_NULL, related_name="+")
    deployment = models.ForeignKey("providers.Deployment", null=True, on_delete=models.SET_NULL, related_name="+")
    # Names are copied so that the ledger still reads right after a catalog row is renamed or deleted.
    provider_name = models.CharField(max_length=64, blank=True)
    model_name = models.CharField(max_length=128, blank=True, help_text="The public model that answered.")
    deployment_name = models.CharField(max_length=64, blank=True)
    requested_model = models.CharField(
        max_length=128,
        blank=True,
        help_text="The name the client sent, when another model answered (an alias or a fallback).",
    )
    attempts = models.PositiveSmallIntegerField(
        default=0, help_text="Upstream calls made: retries and fallbacks included."
    )
    resumed = models.BooleanField(default=False, help_text="A stream that failed midway and was continued elsewhere.")
    endpoint = models.CharField(max_length=16, choices=Endpoint.choices)
    operation = models.CharField(max_length=16, choices=Operation.choices, default=Operation.CHAT)
    stream = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    # db_default too: a writer that names its columns without this one (the previous release's, during a
    # rolling deploy; bench/ledger_scale.py) still inserts.
    cache_write_tokens = models.PositiveIntegerField(
        default=0,
        db_default=0,
        help_text="Prompt tokens written to the provider's prompt cache (part of prompt_tokens).",
    )
    cache_write_1h_tokens = models.PositiveIntegerField(
        default=0,
        db_default=0,
        help_text="Of the cache writes, those to Anthropic's 1-hour cache (part of cache_write_tokens).",
    )
    web_search_requests = models.PositiveIntegerField(
        default=0,
        db_default=0,
        help_text="Web searches the provider billed apart from the tokens (Anthropic's server tool), priced per "
        "1,000 in cost.",
    )
    service_tier = models.CharField(
        max_length=16,
        blank=True,
        default="",
        db_default="",
        help_text="The service tier the tokens were charged at: priority or flex (OpenAI's, as its reply said it "
        "served the request, else as asked), at the deployment's factor of it; empty: the standard prices.",
    )
    cost = models.DecimalField(max_digits=20, decimal_places=10, default=Decimal("0"))
    usage_estimated = models.BooleanField(default=False, help_text="The provider sent no usage; tokens were counted.")
    upstream_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Time to first token.")
    duration_ms = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=24, choices=UsageStatus.choices)
    error_type = models.CharField(max_length=64, blank=True)
    billing_source = models.CharField(
        max_length=16,
        choices=BillingSource.choices,
        default=BillingSource.PLATFORM,
        help_text="Whose provider key paid: the platform's, or the user's own (bring your own key).",
    )
    user_key_cost = models.DecimalField(
        max_digits=20,
        decimal_places=10,
        null=True,
        blank=True,
        help_text="On a user's own key: the request's price at catalog prices, paid on their account. ``cost`` "
        "holds what counts against the platform's budgets (zero unless the plan counts own-key spend).",
    )
    moderation = models.CharField(
        max_length=200, blank=True, help_text="What moderation found, e.g. 'flagged input: violence'."
    )
    # The A/B experiment the request was assigned in, and its variant (``experiments``): plain ids, since
    # billing sits below experiments and the row must outlive an experiment that is deleted.
    experiment_id = models.PositiveBigIntegerField(null=True, blank=True)
    experiment_variant_id = models.PositiveBigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "created_at"]),
            models.Index(fields=["api_key", "created_at"]),
            # Every column an experiment's results read (experiments/results.py), so that they are answered
            # from this index alone: the experiment's rows are a few percent of the traffic, scattered over
            # the whole heap, and reading them from it cost a page a row, 250 ms a query over 78,000 rows
            # in a 10-million-row ledger. Partial: only rows in an experiment are in it (docs/ledger.md).
            # duration_ms right after status: a variant's served rows are then in latency order, and its
            # percentiles are read off the index (1-4 ms) instead of sorting them (10-17 ms a percentile).
            models.Index(
                fields=[
                    "experiment_id",
                    "experiment_variant_id",
                    "status",
                    "duration_ms",
                    "created_at",
                    "stream",
                    "ttft_ms",
                    "cost",
                    "user_key_cost",
                    "user_id",
                    "api_key_id",
                    "id",
                    "request_id",
                ],
                condition=models.Q(experiment_id__isnull=False),
                name="billing_usage_experiment_cover",
            ),
            # The same for time to first token, over the streamed rows that have one.
            models.Index(
                fields=["experiment_id", "experiment_variant_id", "status", "ttft_ms"],
                condition=models.Q(experiment_id__isnull=False, stream=True, ttft_ms__isnull=False),
                name="billing_usage_experiment_ttft",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model_name} {self.status}"


class Plan(models.Model):
    """What a user may spend and use. A user's own overrides (``UserPlan``) win over the plan's values.

    Models: ``allow_all_models``, or the models listed, or any model whose output price is at most
    ``max_output_price_per_mtok`` (so "the cheapest models" stays true when the catalog changes)."""

    name = models.CharField(max_length=64, unique=True)
    description = models.CharField(max_length=300, blank=True)
    allow_all_models = models.BooleanField(default=False)
    allowed_models = models.ManyToManyField("providers.CatalogModel", blank=True, related_name="+")
    max_output_price_per_mtok = models.DecimalField(
        "also allow models with output $/Mtok up to",
        max_digits=12,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
    )
    daily_token_quota = models.PositiveBigIntegerField(null=True, blank=True, help_text="Empty: unlimited.")
    monthly_budget_usd = models.DecimalField(
        "monthly budget (USD)",
        max_digits=14,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Empty: unlimited.",
    )
    rpm = models.PositiveIntegerField("requests per minute", null=True, blank=True, help_text="Empty: unlimited.")
    tpm = models.PositiveIntegerField("tokens per minute", null=True, blank=True, help_text="Empty: unlimited.")
    byok_counts_against_budget = models.BooleanField(
        "own-key spend counts against budgets",
        default=False,
        help_text="Whether requests made on a user's own provider key count against this plan's budgets "
        "(rate limits and token quotas always apply).",
    )
    moderation_policy = models.ForeignKey(
        "providers.ModerationPolicy",
        null=True,
        blank=True,
        on_delete=models.PROTECT,  # deleting a policy in use would silently unprotect its users
        related_name="+",
        help_text="Checks on the input and output of this plan's users' requests (besides the model's policy).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class UserPlan(models.Model):
    """A user's plan, with per-user overrides; an empty override means "as the plan says"."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="billing_plan")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="subscriptions")
    daily_token_quota = models.PositiveBigIntegerField("daily token quota override", null=True, blank=True)
    monthly_budget_usd = models.DecimalField(
        "monthly budget override (USD)",
        max_digits=14,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
    )
    rpm = models.PositiveIntegerField("requests per minute override", null=True, blank=True)
    tpm = models.PositiveIntegerField("tokens per minute override", null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "user plan"

    def __str__(self) -> str:
        return f"{self.user} on {self.plan}"


class BudgetMetric(models.TextChoices):
    COST = "cost", "Spend (USD)"
    TOKENS = "tokens", "Tokens"


class ScopeKind(models.TextChoices):
    USER = "user", "User"
    KEY = "key", "API key"


class BudgetCounter(models.Model):
    """Spend of one scope in one period, for the database path of admission (no Redis).

    ``reserved`` is the sum of the open reservations below; ``spent`` follows the ledger, and the
    reconcile task puts it back on the ledger's figure if a settle was ever lost."""

    key = models.CharField(max_length=120, unique=True)
    scope_kind = models.CharField(max_length=8, choices=ScopeKind.choices)
    scope_id = models.BigIntegerField()
    metric = models.CharField(max_length=8, choices=BudgetMetric.choices)
    period = models.CharField(max_length=8, choices=BudgetPeriod.choices)
    period_start = models.DateTimeField()
    spent = models.DecimalField(max_digits=24, decimal_places=10, default=Decimal("0"))
    reserved = models.DecimalField(max_digits=24, decimal_places=10, default=Decimal("0"))
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-period_start", "key"]
        indexes = [models.Index(fields=["scope_kind", "scope_id", "period_start"])]

    def __str__(self) -> str:
        return self.key


class BudgetReservation(models.Model):
    """What one request holds against a counter until it settles. Settled rows are kept a little
    while (``settled_at``) so that reconciliation can tell a settled request whose ledger row is
    still on its way from one that never happened."""

    counter = models.ForeignKey(BudgetCounter, on_delete=models.CASCADE, related_name="reservations")
    request_id = models.CharField(max_length=64)
    amount = models.DecimalField(max_digits=24, decimal_places=10)
    expires_at = models.DateTimeField()
    settled_at = models.DateTimeField(null=True, blank=True)
    settled_amount = models.DecimalField(max_digits=24, decimal_places=10, null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["counter", "request_id"], name="billing_reservation_once_per_counter")
        ]
        indexes = [models.Index(fields=["counter", "settled_at", "expires_at"])]

    def __str__(self) -> str:
        return f"{self.request_id} on {self.counter_id}"


class RequestReservation(models.Model):
    """The record of one admitted request still in flight, for the database path of admission (Redis keeps
    the same record in a hash per process): written in the transaction that reserves its budget; the one
    that settles it keeps it with the request's ledger row (``settled_row``), and the transaction that
    inserts that row deletes it. A record whose process is gone (``ProcessHeartbeat`` expired) becomes, by
    the lost-request sweep (``billing.services.inflight``): if settled, its row; if not, a ``lost`` ledger
    row at the reserved amount, and its holds are released."""

    request_id = models.CharField(max_length=64, unique=True)
    instance = models.CharField(max_length=160, db_index=True, help_text="The server process that admitted it.")
    user_id = models.BigIntegerField(null=True)
    api_key_id = models.BigIntegerField(null=True)
    model_id = models.BigIntegerField(null=True)
    provider_id = models.BigIntegerField(null=True)
    model_name = models.CharField(max_length=128, blank=True)
    provider_name = models.CharField(max_length=64, blank=True)
    endpoint = models.CharField(max_length=16, blank=True)
    stream = models.BooleanField(default=False)
    counters = models.JSONField(default=list, help_text="Keys of the budget counters it holds.")
    reserved_cost = models.DecimalField(max_digits=24, decimal_places=10)
    prompt_tokens = models.PositiveIntegerField(default=0)
    reserved_tokens = models.PositiveIntegerField(default=0, help_text="Prompt and completion tokens reserved.")
    web_search_requests = models.PositiveIntegerField(
        default=0,
        db_default=0,  # a row an older release inserts during a deploy
        help_text="The web searches reserved (the most the request may run), at the search price in the reserved cost.",
    )
    resumes = models.PositiveSmallIntegerField(
        default=0,
        db_default=0,  # a row an older release inserts during a deploy
        help_text="The attempts past the first that may answer (a stream resumed on failure), each with its prompt "
        "reserved.",
    )
    prefill_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="The resumed attempts' prefills reserved (the reply so far, at most the client's output limit "
        "each); empty when llmhub picked the limit: one a resume for each completion token reserved.",
    )
    admitted_at = models.DateTimeField(help_text="On the server's clock: the period its spend belongs to.")
    # On the database's clock, like the heartbeats, so that a record is never judged against a heartbeat
    # its process had no time to write yet.
    recorded_at = models.DateTimeField(db_default=Now())
    settled_row = models.JSONField(
        null=True,
        blank=True,
        help_text="Once settled: the request's ledger row, kept with the record until the row is written.",
    )

    def __str__(self) -> str:
        return f"{self.request_id} on {self.instance}"


class ProcessHeartbeat(models.Model):
    """A server process that may hold ``RequestReservation`` rows says it is alive; ``expires_at`` is on
    the database's clock (``Now()``), which every process shares whatever its own clock says."""

    instance = models.CharField(max_length=160, primary_key=True)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.instance


class BudgetAlert(models.Model):
    """A budget threshold crossed; the unique constraint is what makes each one fire once per period and limit
    (a budget raised after it fired sets a new limit, whose thresholds the spend has not reached fire again)."""

    scope_kind = models.CharField(max_length=8, choices=ScopeKind.choices)
    scope_id = models.BigIntegerField()
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    metric = models.CharField(max_length=8, choices=BudgetMetric.choices)
    period = models.CharField(max_length=8, choices=BudgetPeriod.choices)
    period_start = models.DateTimeField()
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the limit.")
    limit = models.DecimalField(max_digits=24, decimal_places=10)
    spent = models.DecimalField(max_digits=24, decimal_places=10, help_text="When the threshold was crossed.")
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True, help_text="When the email went out.")
    channels = models.JSONField(default=list, blank=True, help_text="Channels that delivered it.")
    delivery = delivery_field()

    class Meta:
        ordering = ["-created_at"]
        # The alert sweep reads the last day's alerts every minute (``services.alert_sweep``).
        indexes = [models.Index(fields=["created_at"], name="billing_alert_created")]
        constraints = [
            models.UniqueConstraint(
                fields=["scope_kind", "scope_id", "metric", "period_start", "threshold", "limit"],
                name="billing_alert_once_per_threshold_limit_and_period",
            )
        ]

    def __str__(self) -> str:
        return f"{self.scope_kind}:{self.scope_id} {self.metric} {self.threshold}% ({self.period_start:%Y-%m-%d})"


class RollupFigures(models.Model):
    """What every rollup sums per day and group (``DailyUsage``, ``DailyStaffUsage``, ``DailyUserUsage``): the
    requests, their tokens and their cost. One home, so that the three cannot drift apart (the services sum them
    by name: ``services.rollups.DAILY_USAGE_FIGURES``)."""

    requests = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    # db_default: added to DailyUsage's table of thousands of rows a day, the column cost no rewrite on PostgreSQL.
    cache_write_tokens = models.PositiveBigIntegerField(
        default=0, db_default=0, help_text="Prompt tokens written to the provider's prompt cache (part of prompt)."
    )
    cache_write_1h_tokens = models.PositiveBigIntegerField(
        default=0,
        db_default=0,
        help_text="Of the cache writes, those to Anthropic's 1-hour cache (part of cache_write_tokens).",
    )
    web_search_requests = models.PositiveBigIntegerField(
        default=0,
        db_default=0,
        help_text="Web searches the providers billed apart from the tokens (the ledger's web_search_requests).",
    )
    cost = models.DecimalField(max_digits=20, decimal_places=10, default=Decimal("0"))

    class Meta:
        abstract = True


class DailyUsage(RollupFigures):
    """The ledger summed per day, user, key, provider, model and operation: derived, rebuilt from ``UsageRecord``
    at will."""

    day = models.DateField()
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    provider_name = models.CharField(max_length=64, blank=True)
    model_name = models.CharField(max_length=128, blank=True)
    # Empty on the rows rolled up before the column existed (db_default: no rewrite of the table): read as
    # "unknown" until their day is rebuilt from the ledger (docs/ledger.md, "Per operation").
    operation = models.CharField(
        max_length=16,
        choices=Operation.choices,
        blank=True,
        default="",
        db_default="",
        help_text="What the requests asked for (the ledger's operation); empty: rolled up before it was kept.",
    )

    class Meta:
        ordering = ["-day", "model_name"]
        verbose_name_plural = "daily usage"
        indexes = [models.Index(fields=["day"]), models.Index(fields=["user", "day"])]

    def __str__(self) -> str:
        return f"{self.day} {self.model_name} ${self.cost}"


class DailyStaffUsage(RollupFigures):
    """``DailyUsage`` without user and key: the ledger summed per day, provider, model and operation (a hundred
    rows a day, however many users and keys), what the staff pages read for everyone's figures except per user
    (``selectors.usage_daily``/``usage_breakdown``). Derived from the day's ``DailyUsage`` in the transaction
    that writes it (``services.rollups.daily_rollups_derive``), so it holds the same ledger rows, up to
    the same ``DailyUsageMark``; like ``DailyUsage`` it outlives the raw rows retention deletes."""

    day = models.DateField()
    provider_name = models.CharField(max_length=64, blank=True)
    model_name = models.CharField(max_length=128, blank=True)
    operation = models.CharField(max_length=16, choices=Operation.choices, blank=True, default="")

    class Meta:
        ordering = ["-day", "model_name"]
        verbose_name_plural = "daily staff usage"
        constraints = [
            models.UniqueConstraint(
                fields=["day", "provider_name", "model_name", "operation"], name="billing_daily_staff_usage_group"
            )
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.model_name} {self.operation} ${self.cost}"


class DailyUserUsage(RollupFigures):
    """``DailyUsage`` without key, provider, model and operation: the ledger summed per day and user (one row each
    a day, however many keys, models and operations the user mixes), what the usage pages read for figures per
    user that are not split by key, model or operation (``selectors.usage_daily`` for a user, the staff page's
    spend by user). Derived from the day's ``DailyUsage`` with ``DailyStaffUsage``, in the same transaction
    (``services.rollups.daily_rollups_derive``), so it holds the same ledger rows, up to the same
    ``DailyUsageMark``; like ``DailyUsage`` it outlives the raw rows retention deletes. Rows of deleted users
    are kept under no user."""

    day = models.DateField()
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        ordering = ["-day", "user_id"]
        verbose_name_plural = "daily user usage"
        indexes = [models.Index(fields=["user", "day"], name="billing_daily_user_usage_ud")]
        constraints = [models.UniqueConstraint(fields=["day", "user"], name="billing_daily_user_usage_group")]

    def __str__(self) -> str:
        return f"{self.day} user {self.user_id} ${self.cost}"


class DailyUsageMark(models.Model):
    """How far a day's ``DailyUsage`` goes: it holds that day's ledger rows up to ``through_id``, and none
    above it. Written with the rollup, in its transaction (``services.rollups``). The dashboards read today
    as the rollup plus the raw rows above the mark (``selectors.usage_daily``/``usage_breakdown``), so at
    millions of rows a day they read minutes of raw rows, not the whole day."""

    day = models.DateField(unique=True)
    through_id = models.BigIntegerField(help_text="The last ledger row the day's rollup can hold.")
    rebuilt_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-day"]

    def __str__(self) -> str:
        return f"{self.day} through #{self.through_id}"


class DailyExperimentUsage(models.Model):
    """An A/B experiment's ledger rows summed per UTC day of the request, variant and status: what an
    experiment's results add up across days (``experiments.results``), so that they read a few rows a day
    instead of every request. Derived, like ``DailyUsage``; folded in by ``services.rollups.
    experiment_usage_fold``, which holds every experiment row up to ``ExperimentUsageMark.through_id`` and
    none above it. It outlives the raw rows that retention deletes.

    Sums of squares are what the results' intervals need (a variance from a count, a sum and a sum of
    squares). The price is what the request cost whoever paid (``user_key_cost`` on a user's own key, else
    ``cost``); the time to first token is summed over the streamed rows that have one (``ttft_n``).

    ``experiment_id`` is a plain id, as on the ledger: deleting an experiment (a draft or concluded one) keeps
    its ledger rows and so its rows here, a few a day, which no id of a later experiment reuses."""

    day = models.DateField()
    experiment_id = models.PositiveBigIntegerField()
    experiment_variant_id = models.PositiveBigIntegerField()
    status = models.CharField(max_length=24)
    requests = models.PositiveIntegerField(default=0)
    duration_sum = models.BigIntegerField(default=0)
    duration_squares = models.FloatField(default=0.0)
    ttft_n = models.PositiveIntegerField(default=0)
    ttft_sum = models.BigIntegerField(default=0)
    ttft_squares = models.FloatField(default=0.0)
    price = models.DecimalField(max_digits=24, decimal_places=10, default=Decimal("0"))
    price_squares = models.DecimalField(max_digits=44, decimal_places=20, default=Decimal("0"))

    class Meta:
        ordering = ["experiment_id", "day", "experiment_variant_id", "status"]
        verbose_name_plural = "daily experiment usage"
        constraints = [
            models.UniqueConstraint(
                fields=["experiment_id", "experiment_variant_id", "day", "status"], name="billing_dailyexp_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.day} experiment {self.experiment_id}/{self.experiment_variant_id} {self.status}: {self.requests}"


class DailyUsageScanMark(models.Model):
    """How far the rollup task has looked for late ledger rows: rows of a day older than the days it
    rebuilds (a spool replayed after an outage of days, the lost-request sweep, both of which write a row
    with the time it was made). One row (``pk=1``); each run rolls up again the days that got rows above
    it and moves it to its own high water (``services.rollups.daily_usage_rebuild_recent``)."""

    through_id = models.BigIntegerField(help_text="The last ledger row the rollup task has looked at.")
    scanned_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"late rows looked for through #{self.through_id}"


class ExperimentUsageMark(models.Model):
    """How far ``DailyExperimentUsage`` goes: it holds every experiment's ledger rows up to ``through_id``
    and none above. One row (``pk=1``), moved forward by each fold in the fold's transaction; the results
    read the rollup plus the raw rows above it."""

    through_id = models.BigIntegerField(default=0, help_text="The last ledger row the experiment rollup holds.")
    folded_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"experiments through #{self.through_id}"


WEBHOOK_URL_MAX_LENGTH = 500


class OpsAlertKind(models.TextChoices):
    DEPLOYMENT_DOWN = "deployment_down", "Deployment down"
    ERROR_RATE = "error_rate", "Error rate per model"
    LATENCY_P95 = "latency_p95", "p95 latency per model"
    TOKEN_QUOTA = "token_quota", "Daily token quota exhausted"
    SPEND_SPIKE = "spend_spike", "Spend spike"


class OpsAlertRule(models.Model):
    """An operator's alert beyond budgets (``billing.services.ops_alerts``): what is watched, from what
    threshold, over which window, and who is told. ``threshold`` reads by kind: a percent of failed requests
    (error rate), milliseconds (p95 latency), a percent of the quota (token quota), a multiple of the usual
    hour (spend spike); a deployment down needs none (its breaker and health checks decide)."""

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=OpsAlertKind.choices)
    enabled = models.BooleanField(default=True)
    threshold = models.DecimalField(
        max_digits=14,
        decimal_places=4,
        default=Decimal("0"),
        validators=[MinValueValidator(Decimal("0"))],
        help_text="Error rate: percent failed. p95 latency: milliseconds. Token quota: percent used. "
        "Spend spike: times the usual hour. Deployment down: unused.",
    )
    window_minutes = models.PositiveIntegerField(
        default=5, help_text="The span looked at (error rate, latency; the spend spike looks at the last hour)."
    )
    minimum_requests = models.PositiveIntegerField(
        default=20, help_text="Error rate and latency: fewer requests than this in the window say nothing."
    )
    minimum_baseline_usd = models.DecimalField(
        max_digits=14,
        decimal_places=4,
        default=Decimal("1"),
        validators=[MinValueValidator(Decimal("0"))],
        help_text="Spend spike: the usual hour must cost at least this much for a spike to count.",
    )
    clear_after_minutes = models.PositiveIntegerField(
        default=5,
        db_default=5,
        help_text="An open incident clears once the measure has stayed at or under the threshold this long (a "
        "value hovering around it does not open and clear every minute); 0: as soon as it is under.",
    )
    model_name = models.CharField(
        max_length=128, blank=True, help_text="Only this public model (error rate, latency, spend); empty: all."
    )
    # The model it narrows to, followed by its pk: an admin renaming it in the catalog does not leave the rule
    # watching a name no model has. ``model_name`` is its name then (the model's when the rule was last saved or the
    # model deleted); a rule given a name that no model of the catalog has (the shell, the previous release) or whose
    # model was deleted has none, and watches by ``model_name``: never every model.
    model = models.ForeignKey(
        "providers.CatalogModel",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The model it watches, whatever it is named now; empty: the model named by model_name, or all.",
    )
    # The ``model_name`` ``model`` was bound for: one differing from it was edited since (the shell, a queryset's
    # ``update()``, which no save sees) and binds the rule again to the model it names at the next evaluation
    # (``ops_rules_model_bind``); the bound model renamed leaves both as they are (the rule follows its pk).
    # ``db_default``: the previous release, during a rolling deploy, inserts rules without it.
    model_name_bound = models.CharField(
        max_length=128,
        blank=True,
        default="",
        db_default="",
        editable=False,
        help_text="The model name the rule's model was bound for; another model_name binds it again.",
    )
    email_recipients = models.TextField(
        blank=True, help_text="Addresses, comma- or line-separated; empty: ADMINS (or the superusers)."
    )
    # Encrypted: a Slack-style webhook's URL is its credential (whoever reads it can post to the channel).
    webhook_url = EncryptedUrlField(
        blank=True,
        default="",
        help_text="A Slack-compatible webhook; empty: LLMHUB_ALERT_WEBHOOK_URL. Encrypted at rest; only its host "
        "is shown back.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["kind", "name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Bound to the catalog model ``model_name`` names when it has none (a rule created or edited in the shell,
        a fixture, code): by the name alone, it watched a name the model's rename would leave behind. The rule
        the migration 0045 applies to the rules before it; a model an admin chose is kept, and a name no model has
        is watched as it is. A ``model_name`` changed since the rule was bound (``model_name_bound``; the shell:
        ``rule.model_name = "gpt-4o"``, or a queryset's ``update()`` before) and naming another model than its own
        binds it to the model so named, or to none (watched by that name; "": every model): kept, the rule watched
        its old model while its name said another. A name left as bound keeps the model, though the model was
        renamed since (its copy of the name is then stale, the model the rule's). A save leaving out ``model_name``
        leaves an edited name to the evaluator's next run (``ops_rules_model_bind``)."""
        bound, bound_for = self.model_id, self.model_name_bound
        update_fields = kwargs.get("update_fields")
        saves_name = update_fields is None or "model_name" in update_fields
        edited = saves_name and not self._state.adding and self.model_name != bound_for
        if edited and bound is not None and self.model.name != self.model_name:
            self.model = None
        if self.model_id is None and self.model_name:
            self.model = CatalogModel.objects.filter(name=self.model_name).first()
        if saves_name:
            self.model_name_bound = self.model_name
        if update_fields is not None:
            changed = {"model": self.model_id != bound, "model_name_bound": self.model_name_bound != bound_for}
            kwargs["update_fields"] = [*update_fields, *(f for f, c in changed.items() if c and f not in update_fields)]
        super().save(*args, **kwargs)

    @property
    def watched_model_name(self) -> str:
        """The name of the one model it watches ("": every model, or all spend): its model's as the catalog names it
        now, else ``model_name``."""
        return self.model.name if self.model_id is not None and self.model is not None else self.model_name

    @property
    def recipients(self) -> list[str]:
        """The addresses of ``email_recipients``, comma- or line-separated."""
        return [part.strip() for part in self.email_recipients.replace("\n", ",").split(",") if part.strip()]

    def clean(self) -> None:
        errors = {}
        # An address the mail server would refuse loses every alert of the rule, long after it was saved.
        for entry in self.recipients:
            try:
                validate_email(entry)
            except ValidationError:
                errors["email_recipients"] = (
                    f"Not an email address: {entry[:100]}. Separate addresses with commas or new lines."
                )
                break
        # Early and friendly, for the admin; every delivery is judged again when it connects.
        if self.webhook_url and not isinstance(self.webhook_url, UnreadableSecretUrl):  # unreadable: kept as stored
            url = self.webhook_url.reveal()
            if len(url) > WEBHOOK_URL_MAX_LENGTH:
                raise ValidationError({"webhook_url": f"At most {WEBHOOK_URL_MAX_LENGTH} characters."})
            validate_provider_url(url, field="webhook_url")
        # In clean(), not a field validator: the admin's form and its list's editable columns both run it.
        if self.window_minutes is not None and self.window_minutes < 1:
            errors["window_minutes"] = "A window of at least one minute: an empty one holds no request."
        problem = self._threshold_problem()
        if problem:
            errors["threshold"] = problem
        if errors:
            raise ValidationError(errors)

    def _threshold_problem(self) -> str:
        """Why ``threshold`` can never mean an incident for this kind (never reached, or always), or "". The
        measures compare: error rate ``>``, p95 latency ``>``, token quota ``>=``, spend spike ``>``."""
        threshold = self.threshold
        if threshold is None:
            return ""
        if self.kind == OpsAlertKind.ERROR_RATE and not Decimal(0) <= threshold < 100:
            return "A percent of requests failed, from 0 to below 100: the rate must go above it."
        if self.kind == OpsAlertKind.TOKEN_QUOTA and not Decimal(0) < threshold <= 100:
            return "A percent of the daily quota used, above 0 and at most 100."
        if self.kind == OpsAlertKind.LATENCY_P95 and threshold <= 0:
            return "Milliseconds, above 0: every request takes longer than 0 ms."
        if self.kind == OpsAlertKind.SPEND_SPIKE and threshold <= 1:
            return "Times the usual hour, above 1: an hour costing no more than the usual one is no spike."
        return ""


class OpsAlertIncident(models.Model):
    """One incident of a rule for one subject (a model, a user, "all"), from the evaluation that found it to
    the one that found it over: one alert when it opens, one when it clears. At most one is open per rule and
    subject (a unique constraint), so evaluators running at once cannot open two."""

    # Kept when its rule is deleted: the open one is closed then, and its notice still has to go out (with what
    # the rule said of who is told, kept below).
    rule = models.ForeignKey(OpsAlertRule, null=True, blank=True, on_delete=models.SET_NULL, related_name="incidents")
    # db_default on the columns added since incidents were first written: the previous release's code, still
    # running during a rolling deploy, inserts incidents without naming them.
    rule_name = models.CharField(
        max_length=100, blank=True, db_default="", help_text="The rule's name, once the rule is deleted."
    )
    kept_recipients = models.TextField(blank=True, db_default="", help_text="The deleted rule's email recipients.")
    kept_webhook_url = EncryptedUrlField(
        blank=True, default="", db_default="", help_text="The deleted rule's own webhook."
    )
    subject = models.CharField(max_length=200, help_text='What it is about: "model:gpt-4o", "user:12", "all".')
    # A model's incident (error rate, p95 latency, a spend spike of a rule narrowed to one model) follows the model,
    # not its name: renamed in the catalog while the incident is open, it is the same outage (its subject takes the
    # new name). Empty: not a model's, opened before this was kept, by a rule watching a name no model has, or the
    # model was deleted.
    model = models.ForeignKey(
        "providers.CatalogModel",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The model it is about (error rate, p95 latency, spend spike), whatever it is named now.",
    )
    renamed_from = models.CharField(
        max_length=200,
        blank=True,
        db_default="",  # the previous release's code, during a rolling deploy, inserts without naming it
        help_text="The subject it opened as, when its model was renamed since.",
    )
    opened_at = models.DateTimeField()
    cleared_at = models.DateTimeField(null=True, blank=True)
    value_at_open = models.DecimalField(max_digits=24, decimal_places=6)
    # Its alerts quote it: an admin may edit the rule's threshold while the incident is open. Empty on those
    # opened before it was kept (and by the previous release's code, during a rolling deploy): the rule's is quoted.
    threshold = models.DecimalField(
        max_digits=14,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="The rule's threshold when it opened; empty: opened before it was kept.",
    )
    peak = models.DecimalField(max_digits=24, decimal_places=6)
    value_at_clear = models.DecimalField(max_digits=24, decimal_places=6, null=True, blank=True)
    under_since = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Open: since when the measure has read at or under the threshold (it clears after the rule's "
        "clear_after_minutes); empty while it is above.",
    )
    detail = models.CharField(max_length=300, blank=True, help_text="What was measured, in words, at opening.")
    closed_because = models.CharField(
        max_length=200,
        blank=True,
        db_default="",  # the previous release's code, during a rolling deploy, inserts without naming it
        help_text='Why it was closed when that was no recovery: "the rule was disabled by alice". Empty: it cleared.',
    )
    delivered = models.JSONField(
        default=list, blank=True, help_text='Deliveries made: "open:email", "open:webhook", "clear:email", …'
    )
    delivery = delivery_field()

    class Meta:
        ordering = ["-opened_at"]
        # The alert sweep reads the incidents opened or cleared in the last day every minute.
        indexes = [
            models.Index(fields=["opened_at"], name="billing_ops_incident_opened"),
            models.Index(fields=["cleared_at"], name="billing_ops_incident_cleared"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["rule", "subject"],
                condition=models.Q(cleared_at__isnull=True),
                name="billing_one_open_ops_incident_per_rule_and_subject",
            )
        ]

    def __str__(self) -> str:
        return f"{self.rule or self.rule_name} {self.subject} since {self.opened_at:%Y-%m-%d %H:%M}"


class DailyUsageSeal(models.Model):
    """A day whose raw ledger rows the retention pass deletes (``LLMHUB_LEDGER_RETENTION_DAYS``).

    Sealing rebuilds the day's ``DailyUsage`` one last time with the ledger closed to writes, so that it
    holds every row of that day up to ``through_id``; those rows can then go. From then on the day's
    rollup is never rebuilt from the ledger (the rows it sums are gone): a row of that day written later
    (a spool replayed after a long outage) is added to it by the rollup task's next run, which moves
    ``through_id`` past it, or by the retention pass that deletes it if that comes first
    (``services.rollups._sealed_day_catch_up``)."""

    day = models.DateField(unique=True)
    through_id = models.BigIntegerField(help_text="The last ledger row of the day the sealed rollup holds.")
    sealed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-day"]

    def __str__(self) -> str:
        return f"{self.day} through #{self.through_id}"


class TaskRun(models.Model):
    """The latest run of one Celery task, as the worker that ran it finished it: one row per task name, updated
    in place at every run (``services/task_runs.py``, from the worker's ``task_postrun`` signal), so that the
    operations dashboard and ``/metrics`` can tell a background job that stopped or keeps failing. Only an
    exception's class is kept, never its message: a message may carry a secret (a URL with credentials, a
    provider's key in an error body)."""

    task = models.CharField(max_length=200, unique=True, help_text="The task's dotted name.")
    finished_at = models.DateTimeField()
    succeeded = models.BooleanField()
    duration_seconds = models.FloatField()
    error_class = models.CharField(max_length=200, blank=True, help_text="The exception's class of a failed run.")
    failures_in_a_row = models.PositiveIntegerField(default=0)
    last_success_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["task"]

    def __str__(self) -> str:
        outcome = "ok" if self.succeeded else f"failed: {self.error_class}"
        return f"{self.task} at {self.finished_at:%Y-%m-%d %H:%M:%S} ({outcome})"
