from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

from core.outbox import delivery_field

from .fields import EncryptedMappingField, EncryptedTextField, Secret
from .tokens import upstream_searches_every_request


class ProviderKind(models.TextChoices):
    OPENAI = "openai", "OpenAI"
    ANTHROPIC = "anthropic", "Anthropic"
    OPENROUTER = "openrouter", "OpenRouter"
    OLLAMA = "ollama", "Ollama"
    VLLM = "vllm", "vLLM"
    OPENAI_COMPATIBLE = "openai_compatible", "OpenAI-compatible server"
    AZURE_OPENAI = "azure_openai", "Azure OpenAI"
    MISTRAL = "mistral", "Mistral"
    GEMINI = "gemini", "Google Gemini"
    COHERE = "cohere", "Cohere"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def url_origin(url: str) -> str:
    """The host a URL sends to, ``scheme://host[:port]`` (lower case, the scheme's default port left out):
    what a user agrees to send their own key to. A path on the same host is the same origin."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if not scheme or not host:
        return ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS.get(scheme) else "")


# Where each kind lives when the admin leaves the base URL empty.
DEFAULT_BASE_URLS: dict[str, str] = {
    ProviderKind.OPENAI: "https://api.openai.com/v1",
    ProviderKind.ANTHROPIC: "https://api.anthropic.com",
    ProviderKind.OPENROUTER: "https://openrouter.ai/api/v1",
    ProviderKind.OLLAMA: "http://127.0.0.1:11434/v1",
    ProviderKind.VLLM: "http://127.0.0.1:8000/v1",
    ProviderKind.OPENAI_COMPATIBLE: "",
    ProviderKind.AZURE_OPENAI: "",  # https://<resource>.openai.azure.com: every resource has its own
    ProviderKind.MISTRAL: "https://api.mistral.ai/v1",
    ProviderKind.GEMINI: "https://generativelanguage.googleapis.com",
    ProviderKind.COHERE: "https://api.cohere.com",
}


# RFC 9110: a name is a token; a value is visible ASCII, spaces and tabs (no CR or LF, which would split it).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


class HealthStatus(models.TextChoices):
    UNKNOWN = "unknown", "Unknown"
    OK = "ok", "OK"
    FAILING = "failing", "Failing"


class ByokMode(models.TextChoices):
    DISABLED = "disabled", "Disabled: the provider's key only"
    OPTIONAL = "optional", "Optional: a user's own key when they have one, else the provider's"
    REQUIRED = "required", "Required: only users with their own key may use its deployments"


class Provider(models.Model):
    name = models.SlugField(max_length=64, unique=True, help_text="Shown to clients as owned_by.")
    kind = models.CharField(max_length=32, choices=ProviderKind.choices)
    base_url = models.URLField(max_length=500, blank=True, help_text="Leave empty for the kind's default endpoint.")
    api_key = EncryptedTextField(blank=True, default="", help_text="Encrypted at rest; never shown back.")
    organization = models.CharField(max_length=128, blank=True)
    api_version = models.CharField(
        max_length=32, blank=True, help_text="Azure OpenAI's api-version (e.g. 2024-10-21); other kinds ignore it."
    )
    extra_headers = EncryptedMappingField(
        default=dict,
        blank=True,
        help_text=(
            "Sent with every upstream request. Values are encrypted at rest and shown masked (…abcd): leave a "
            "masked value as it is to keep it, type a new value to replace it, remove the name to drop it. With a "
            "user's own key (bring your own key), a header whose name says auth, key, token, secret, cookie, "
            "password, organization, project, account, tenant or workspace (Authorization, OpenAI-Project, "
            "Helicone-Auth…) is not sent: it is the platform's; the others (HTTP-Referer, X-Title, anthropic-beta…) "
            "are."
        ),
    )
    timeout_seconds = models.DecimalField(
        max_digits=6, decimal_places=1, default=Decimal("60.0"), validators=[MinValueValidator(Decimal("0.1"))]
    )
    enabled = models.BooleanField(default=True)
    byok = models.CharField(
        "bring your own key",
        max_length=16,
        choices=ByokMode.choices,
        default=ByokMode.DISABLED,
        help_text="Whether users may call this provider's deployments with their own API key.",
    )

    last_health_status = models.CharField(max_length=16, choices=HealthStatus.choices, default=HealthStatus.UNKNOWN)
    last_health_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    last_health_error = models.CharField(max_length=500, blank=True)
    last_health_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [
            (
                "move_provider",
                "Can move a provider holding keys (change its base URL or kind)",
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def effective_base_url(self) -> str:
        return self.base_url or DEFAULT_BASE_URLS.get(self.kind, "")

    @property
    def origin(self) -> str:
        """The host its requests go to (``url_origin``): users' own keys go only where their owners agreed."""
        return url_origin(self.effective_base_url)

    def clean(self) -> None:
        from .validators import validate_provider_url

        if not self.effective_base_url:
            raise ValidationError({"base_url": "This kind of provider has no default endpoint: give a base URL."})
        validate_provider_url(self.effective_base_url, field="base_url")
        if self.kind == ProviderKind.AZURE_OPENAI and not self.api_version.strip():
            raise ValidationError({"api_version": "Azure OpenAI needs an api-version (e.g. 2024-10-21)."})
        headers = self.extra_headers
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, Secret) for k, v in headers.items()
        ):
            raise ValidationError({"extra_headers": "Give a JSON object of header names to string values."})
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValidationError({"extra_headers": f"{name!r} is not a valid header name."})
            # HTTP clients send header values as ASCII. The message names the header, never the value.
            if not _HEADER_VALUE.fullmatch(value.reveal()):
                raise ValidationError(
                    {
                        "extra_headers": f"The value of {name} is not a valid header value (printable ASCII). "
                        "A masked value (…) keeps only the value stored under the same name: type the whole value."
                    }
                )


class ModelMode(models.TextChoices):
    CHAT = "chat", "Chat"
    EMBEDDING = "embedding", "Embedding"


class RoutingStrategy(models.TextChoices):
    WEIGHTED = "weighted", "Weighted (random by weight)"
    PRIORITY = "priority", "Priority (lowest number first)"
    LOWEST_LATENCY = "lowest_latency", "Lowest latency"
    LEAST_BUSY = "least_busy", "Least busy (fewest requests in flight)"
    CHEAPEST = "cheapest", "Cheapest"


def _price_field(label: str, **kwargs: object) -> models.DecimalField:
    return models.DecimalField(label, max_digits=12, decimal_places=6, validators=[MinValueValidator(0)], **kwargs)


# A window or a reply of 0 tokens holds nothing: every reader took a 0 for "not known" (the token estimator, admission,
# the output limit check) but the chat page, which sent no history for a window of 0, and /v1/models, which said
# max_input_tokens 0. Refused where it is typed, saying what to write instead.
CONTEXT_AT_LEAST_ONE = MinValueValidator(
    1, message="A context window of 0 tokens holds no prompt: give the model's context length in tokens."
)
OUTPUT_AT_LEAST_ONE = MinValueValidator(
    1, message="0 would be a model that writes nothing: leave it empty when the most it writes is not known."
)


# A tier's price factor of 0 charged the tokens of every request served at that tier nothing, whatever the deployment's
# prices (billing.pricing.tier_factor: no cost in the ledger, no budget spent), where OpenAI bills priority about twice
# the standard prices and flex half of them. A free deployment says so with its prices; an empty factor is "the
# standard prices".
FACTOR_ABOVE_ZERO = MinValueValidator(
    Decimal("0.0001"),
    message="0 would charge this tier nothing: leave it empty to charge it the standard prices.",
)


class CatalogModel(models.Model):
    """A public model: the name clients send, what it can do, and how a request for it is routed among its
    ``Deployment``s. An alias (``alias_of``) is a second public name for another model and has none of its
    own. (Not called ``Model``: it would shadow ``django.db.models.Model`` in every reader's head.)"""

    name = models.CharField(max_length=128, unique=True, help_text="The public name clients send as `model`.")
    label = models.CharField(max_length=128, blank=True, help_text="Shown in the chat picker; empty: the name.")
    alias_of = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="aliases",
        help_text="Make this name an alias: requests for it are served by that model (its deployments, "
        "prices and routing); plan and key allow-lists are checked against that model.",
    )
    mode = models.CharField(
        max_length=16,
        choices=ModelMode.choices,
        default=ModelMode.CHAT,
        help_text="What the model does: chat models answer /v1/chat/completions and /v1/messages and appear "
        "in the chat picker; embedding models answer /v1/embeddings only.",
    )
    context_window = models.PositiveIntegerField(
        default=128_000,
        validators=[CONTEXT_AT_LEAST_ONE],
        help_text="The most tokens a request's prompt and reply may hold together.",
    )
    max_output_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[OUTPUT_AT_LEAST_ONE],
        help_text="The most tokens the model writes in one reply. Empty: not known.",
    )
    supports_streaming = models.BooleanField(default=True)
    supports_tools = models.BooleanField(default=True)
    supports_vision = models.BooleanField(default=False)
    supports_json_mode = models.BooleanField(default=True)
    supports_reasoning = models.BooleanField(
        default=False,
        help_text="Reasons when asked with `reasoning_effort` (Claude, Gemini 2.5, OpenAI's reasoning models): the "
        "chat page offers an effort control for it.",
    )
    parameter_rules = models.JSONField(
        default=dict,
        blank=True,
        help_text=(
            'Request rewrites for this model, e.g. {"fixed": {"temperature": 1}, '
            '"rename": {"max_tokens": "max_completion_tokens"}, "drop": ["presence_penalty"]}.'
        ),
    )
    strategy = models.CharField(max_length=16, choices=RoutingStrategy.choices, default=RoutingStrategy.WEIGHTED)
    retries = models.PositiveSmallIntegerField(
        default=2, help_text="Further attempts on this model's other deployments after a retryable failure."
    )
    fallbacks = models.JSONField(
        default=list,
        blank=True,
        help_text='Other public model names tried in order when every deployment failed, e.g. ["claude-haiku"].',
    )
    context_window_fallbacks = models.JSONField(
        default=list,
        blank=True,
        help_text="Public model names tried in order when the prompt is too long for this one.",
    )
    resume_on_failure = models.BooleanField(
        default=False,
        help_text="When a stream fails after it began, continue it on the next deployment with the partial reply "
        "as a prefill (the client sees one stream; the ledger row says it was resumed).",
    )
    stream_idle_timeout_seconds = models.DecimalField(
        max_digits=6,
        decimal_places=1,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal("0.1"))],
        help_text="A stream that sends nothing for this long is ended with an error. Empty: the server's default.",
    )
    moderation_policy = models.ForeignKey(
        "ModerationPolicy",
        null=True,
        blank=True,
        on_delete=models.PROTECT,  # deleting a policy in use would silently unprotect its users
        related_name="+",
        help_text="Checks on this model's input and output (besides the user's plan's policy).",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model"
        verbose_name_plural = "models"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from .rules import validate_parameter_rules

        validate_parameter_rules(self.parameter_rules)
        if self.alias_of_id is not None:
            if self.alias_of_id == self.pk:
                raise ValidationError({"alias_of": "A model cannot be an alias of itself."})
            if self.alias_of is not None and self.alias_of.alias_of_id is not None:
                raise ValidationError({"alias_of": "Point the alias at a model, not at another alias."})
            if self.pk is not None:
                # Its own aliases would become aliases of an alias, which nothing serves.
                names = list(CatalogModel.objects.filter(alias_of=self.pk).values_list("name", flat=True)[:5])
                if names:
                    raise ValidationError(
                        {
                            "alias_of": f"Other aliases name this model ({', '.join(names)}): point them at "
                            "another model first, or they would be aliases of an alias, which nothing serves."
                        }
                    )
        for field in ("fallbacks", "context_window_fallbacks"):
            value = getattr(self, field)
            if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
                raise ValidationError({field: "Give a list of public model names."})
            if self.name in value:
                raise ValidationError({field: "A model cannot fall back to itself."})
            if value and self.mode == ModelMode.EMBEDDING:
                # The router follows no embedding model's fallbacks (``chat.pipeline._fallbacks_for``).
                raise ValidationError(
                    {
                        field: "An embedding model cannot fall back to another model: another model's vectors are "
                        "in another space (often of another size), which the client's index cannot compare with "
                        "this one's. Add a deployment of this model on another provider instead."
                    }
                )


class EveryRequestSearch(models.TextChoices):
    """Whether a deployment's upstream model searches the web on every request (and bills each search), whatever
    the request asks: OpenAI's search models do (``providers.tokens.upstream_searches_every_request``), as do
    answer engines such as Perplexity's Sonar."""

    AUTO = "", "By the upstream id (yes for OpenAI's search models)"
    ALWAYS = "always", "Always: every request runs a web search"
    NEVER = "never", "Never: only a request's web_search_options asks for one"


class BreakerOverride(models.TextChoices):
    NONE = "", "None (the breaker decides)"
    OPEN = "open", "Forced open (no traffic)"
    CLOSED = "closed", "Forced closed (always a candidate)"


# An rpm or tpm cap of 0 would mean "never route here" where an admin typing 0 likely meant "no cap": neither
# is what the field is for, so each has its own way, said in the refusal.
CAP_AT_LEAST_ONE = MinValueValidator(
    1,
    message="0 would send this deployment nothing: leave it empty for no cap, or untick enabled to stop routing to it.",
)


class Deployment(models.Model):
    """One place a public model is served: a provider, the provider's model id, and its prices."""

    # What an admin sets on a deployment besides its name: the admin's inline columns (in their own order:
    # the most used first) and the catalog file's deployment keys (``upstream_id`` spelled ``upstream``).
    SETTINGS = (
        "provider",
        "upstream_id",
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "cache_write_per_mtok",
        "cache_write_1h_per_mtok",
        "web_search_per_1k",
        "searches_every_request",
        "priority_price_factor",
        "flex_price_factor",
        "weight",
        "priority",
        "rpm_limit",
        "tpm_limit",
        "quality",
        "breaker_override",
        "paid_health_probe",
        "enabled",
    )

    model = models.ForeignKey(CatalogModel, on_delete=models.CASCADE, related_name="deployments")
    name = models.SlugField(
        max_length=64,
        blank=True,
        help_text="Unique within the model; sent as x-llmhub-deployment. Empty: the provider's name.",
    )
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="deployments")
    upstream_id = models.CharField(max_length=200, help_text="The provider's own model id.")
    input_per_mtok = _price_field("input $/Mtok", default=Decimal("0"))
    output_per_mtok = _price_field("output $/Mtok", default=Decimal("0"))
    cached_input_per_mtok = _price_field(
        "cached input $/Mtok", null=True, blank=True, help_text="Empty: cached input tokens are priced as input tokens."
    )
    cache_write_per_mtok = _price_field(
        "cache write $/Mtok",
        null=True,
        blank=True,
        help_text="Input tokens written to the provider's prompt cache (Anthropic: 1.25× input for the 5-minute "
        "cache, 2× for the 1-hour one). Empty: priced as input tokens.",
    )
    cache_write_1h_per_mtok = _price_field(
        "1-hour cache write $/Mtok",
        null=True,
        blank=True,
        help_text="Input tokens written to Anthropic's 1-hour prompt cache (2× input), which its usage counts apart "
        "from the 5-minute cache's. Empty: priced as the cache writes above.",
    )
    web_search_per_1k = _price_field(
        "web search $/1,000",
        default=Decimal("0"),
        blank=True,  # empty (or left out of a form) is 0: ``save``
        help_text="Per 1,000 web searches the provider reports (Anthropic's server_tool_use.web_search_requests: "
        "$10 per 1,000), billed beside the tokens; on OpenRouter, per 1,000 results of its web plugin ($4). Empty or "
        "0: searches cost nothing but their tokens.",
    )
    searches_every_request = models.CharField(
        "searches on every request",
        max_length=8,
        choices=EveryRequestSearch.choices,
        default=EveryRequestSearch.AUTO,
        db_default=EveryRequestSearch.AUTO,  # a row an older release inserts during a deploy: decided by its id
        blank=True,
        help_text="Whether the upstream model searches the web before every answer, asked or not (OpenAI's "
        "gpt-4o-search-preview, gpt-4o-mini-search-preview and gpt-5-search-api do), each request then counted one "
        "search at the web search price, reserved at admission. Empty: yes for an upstream id of OpenAI's search "
        "models (also dated or under a router's openai/ prefix), no for any other; an Azure deployment named "
        "otherwise, or another provider's searching model, is set to always here.",
    )
    # OpenAI bills its service tiers (``service_tier``) at their own prices: Priority processing about 1.75–2× the
    # standard token prices, Flex half of them, on the models that offer each. A factor of every token price, rather
    # than a second set of five prices, because OpenAI's tier prices are the standard ones scaled (cached input too).
    priority_price_factor = models.DecimalField(
        "priority price ×",
        max_digits=8,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[FACTOR_ABOVE_ZERO],
        help_text="Every token price is multiplied by this for a request the provider served at OpenAI's Priority "
        "processing (its reply's service_tier: priority; e.g. 2). Empty: priority costs the standard prices.",
    )
    flex_price_factor = models.DecimalField(
        "flex price ×",
        max_digits=8,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[FACTOR_ABOVE_ZERO],
        help_text="Every token price is multiplied by this for a request the provider served at OpenAI's Flex "
        "processing (its reply's service_tier: flex; e.g. 0.5). Empty: flex costs the standard prices.",
    )
    weight = models.PositiveIntegerField(
        default=1,
        help_text="Share of traffic under the weighted strategy; 0: a standby, tried after every deployment with "
        "a weight.",
    )
    priority = models.PositiveSmallIntegerField(default=0, help_text="Lower first, under the priority strategy.")
    rpm_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[CAP_AT_LEAST_ONE],
        help_text="Requests per minute this deployment takes; at the cap it is skipped. Empty: no cap.",
    )
    tpm_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[CAP_AT_LEAST_ONE],
        help_text="Tokens per minute this deployment takes; at the cap it is skipped. Empty: no cap.",
    )
    quality = models.DecimalField(
        max_digits=6,
        decimal_places=3,
        null=True,
        blank=True,
        help_text="A score (higher is better) for requests sent with x-llmhub-route: quality.",
    )
    breaker_override = models.CharField(max_length=8, choices=BreakerOverride.choices, default="", blank=True)
    paid_health_probe = models.BooleanField(
        default=False,
        help_text="Health checks send a one-token completion (billed by the provider) instead of listing models.",
    )
    enabled = models.BooleanField(default=True)
    # Written by the health round only (``services.health``), never by an admin: not in ``SETTINGS``.
    upstream_model_missing_since = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="Since when the provider's model list has lacked the upstream id (or a paid probe got a 404 "
        "for it): a catalog mistake. Empty: found at the last health check, or not checked.",
    )
    # The upstream id found missing: an admin's correction (by any path) ends the claim at once, not at the next
    # round (``upstream_model_missing``).
    upstream_model_missing_id = models.CharField(max_length=200, blank=True, default="", db_default="", editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "priority", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["model", "name"], name="deployment_name_unique_in_model"),
            # A cap of 0 would send the deployment nothing (CAP_AT_LEAST_ONE says so to the admin).
            models.CheckConstraint(
                condition=models.Q(rpm_limit__isnull=True) | models.Q(rpm_limit__gte=1),
                name="deployment_rpm_limit_empty_or_positive",
            ),
            models.CheckConstraint(
                condition=models.Q(tpm_limit__isnull=True) | models.Q(tpm_limit__gte=1),
                name="deployment_tpm_limit_empty_or_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model.name}/{self.name}" if self.model_id else self.name

    def save(self, *args: object, **kwargs: object) -> None:
        if not self.name and self.provider_id is not None:
            self.name = self._free_name()
        if self.web_search_per_1k is None:
            self.web_search_per_1k = Decimal(0)
        super().save(*args, **kwargs)  # type: ignore[arg-type]

    @property
    def searches_on_every_request(self) -> bool:
        """What ``searches_every_request`` says, its empty choice decided by the upstream id."""
        if self.searches_every_request:
            return self.searches_every_request == EveryRequestSearch.ALWAYS
        return upstream_searches_every_request(self.upstream_id)

    @property
    def upstream_model_missing(self) -> datetime | None:
        """Since when the provider has lacked this deployment's upstream id, as the health round found; None when
        it was found, not checked, or the id has been changed since."""
        if self.upstream_model_missing_id != self.upstream_id:
            return None
        return self.upstream_model_missing_since

    def _free_name(self) -> str:
        base = self.provider.name[:60]
        taken = set(
            Deployment.objects.filter(model_id=self.model_id).exclude(pk=self.pk).values_list("name", flat=True)
        )
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name


class HealthCheck(models.Model):
    """One probe of a deployment (``providers.health``): the history shown in the admin."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="health_checks")
    checked_at = models.DateTimeField(db_index=True)
    ok = models.BooleanField()
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    paid = models.BooleanField(default=False)

    class Meta:
        ordering = ["-checked_at"]
        indexes = [models.Index(fields=["deployment", "-checked_at"], name="healthcheck_recent")]

    def __str__(self) -> str:
        return f"{self.deployment_id} {'ok' if self.ok else 'failing'} at {self.checked_at:%Y-%m-%d %H:%M:%S}"


class Incident(models.Model):
    """A deployment down from ``started_at`` until ``ended_at``: one alert when it starts, one when it ends. It
    outlives its deployment (deleted, or its model deleted: ``deployment`` set to null), keeping the names its
    alerts and the admin show; an incident open then is closed first, as no recovery
    (``incidents.deployment_incidents_keep``)."""

    deployment = models.ForeignKey(
        Deployment, on_delete=models.SET_NULL, null=True, blank=True, related_name="incidents"
    )
    # The deleted deployment's names (its model's and provider's too), for its incidents' alerts and the admin.
    # Empty while the deployment exists.
    kept_deployment = models.CharField(max_length=64, blank=True, db_default="")
    kept_model = models.CharField(max_length=128, blank=True, db_default="")
    kept_provider = models.CharField(max_length=64, blank=True, db_default="")
    kept_upstream_id = models.CharField(max_length=200, blank=True, db_default="")
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    ended_because = models.CharField(
        max_length=200,
        blank=True,
        db_default="",  # the previous release's code, during a rolling deploy, inserts without naming it
        help_text="Why it ended when that was no recovery (an admin took the deployment out of service). Empty: it "
        "recovered.",
    )
    delivered = models.JSONField(
        default=list, blank=True, help_text='Deliveries made: "down:email", "down:webhook", "recovered:email", …'
    )
    delivery = delivery_field()

    class Meta:
        ordering = ["-started_at"]
        # The alert sweep (billing) reads the incidents begun or ended in the last day every minute.
        indexes = [
            models.Index(fields=["started_at"], name="providers_incident_started"),
            models.Index(fields=["ended_at"], name="providers_incident_ended"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment"],
                condition=models.Q(ended_at__isnull=True),
                name="one_open_incident_per_deployment",
            )
        ]

    def __str__(self) -> str:
        return f"{self.deployment_id} down since {self.started_at:%Y-%m-%d %H:%M:%S}"


class CredentialStatus(models.TextChoices):
    UNCHECKED = "unchecked", "Unchecked"
    VALID = "valid", "Valid"
    INVALID = "invalid", "Invalid"


# Shown (never stored) instead of the status while the provider points elsewhere than the key's owner agreed.
CREDENTIAL_PAUSED = "paused"


class ProviderCredential(models.Model):
    """A user's own API key for a provider (bring your own key): used instead of the provider's key for that
    user's requests to the provider's deployments, when the provider allows it (``Provider.byok``)."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="provider_credentials")
    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="credentials")
    api_key = EncryptedTextField(help_text="Encrypted at rest; never shown back.")
    label = models.CharField(max_length=100, blank=True)
    hint = models.CharField(max_length=24, blank=True, help_text="The visible start and end of the key (sk-…abcd).")
    status = models.CharField(max_length=16, choices=CredentialStatus.choices, default=CredentialStatus.UNCHECKED)
    status_detail = models.CharField(max_length=300, blank=True, help_text="Why the provider refused the key.")
    last_validated_at = models.DateTimeField(null=True, blank=True)
    unchecked_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the daily check last tried the key and its provider could not be asked (unreachable, 5xx…): "
        "not checked, good or bad, but tried; with the last check, what puts it behind the others in the next run.",
    )
    invalid_notice_due = models.BooleanField(
        default=False,
        db_default=False,  # the previous release's code, during a rolling deploy, adds keys without naming it
        help_text="The owner is still to be emailed that the provider refuses this key (an email that failed is "
        "sent again by the next daily check).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    rotated_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    confirmed_origin = models.CharField(
        max_length=300,
        blank=True,
        # The previous release's code, during a rolling deploy, adds keys without naming it: such a key agreed to
        # no host yet, so it stays paused until its owner confirms one.
        db_default="",
        default="",  # new code fills it in save() from the provider
        help_text="The host (scheme://host:port) its owner agreed to send it to: the provider's when the key was "
        "saved, or the one they confirmed. While the provider points elsewhere, the key is paused (not used).",
    )

    class Meta:
        ordering = ["owner_id", "provider__name"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "provider"], name="one_credential_per_user_and_provider")
        ]

    def __str__(self) -> str:
        return f"{self.provider.name} key {self.hint or '…'} of user {self.owner_id}"

    def save(self, *args, **kwargs) -> None:
        # A key saved without a host agreed (a new row) is agreed for the provider's host of now.
        if not self.confirmed_origin and self.provider_id is not None:
            self.confirmed_origin = self.provider.origin
            if kwargs.get("update_fields") is not None:
                kwargs["update_fields"] = {*kwargs["update_fields"], "confirmed_origin"}
        super().save(*args, **kwargs)

    @property
    def host_paused(self) -> bool:
        """Whether the provider now sends elsewhere than its owner agreed: the key is then not used."""
        return self.confirmed_origin != self.provider.origin

    @property
    def shown_status(self) -> str:
        return CREDENTIAL_PAUSED if self.host_paused else self.status

    @property
    def shown_status_detail(self) -> str:
        if self.host_paused:
            return host_moved_detail(self.provider.name, self.confirmed_origin, self.provider.origin)
        return self.status_detail


class HostMoveNotice(models.Model):
    """The email telling a key's owner that one move of its provider to another host paused the key: claimed before
    it is sent and recorded sent after (``core.outbox``, as the alerts' deliveries), so that whatever runs the move's
    emails again (the fan-out's retry, a re-run) sends each owner theirs once. Made by the key's email task."""

    credential = models.ForeignKey(ProviderCredential, on_delete=models.CASCADE, related_name="host_move_notices")
    move = models.CharField(
        max_length=64, help_text="The move that paused the key (an id given to each move of a provider)."
    )
    delivered = models.JSONField(default=list, blank=True, help_text='Deliveries made: "email".')
    delivery = delivery_field()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["credential", "move"], name="one_host_move_notice_per_key_and_move")
        ]

    def __str__(self) -> str:
        return f"move {self.move} notice of provider key {self.credential_id}"


def host_moved_detail(provider: str, agreed: str, now: str) -> str:
    """Why a key is paused, in the words its owner sees on the page, the API, the email and a 403."""
    return (
        f"The administrator moved the provider {provider} from {agreed or 'its former host'} to {now}: your key is "
        f"not used until you confirm it may be sent to {now}."
    )


class ModerationChecker(models.TextChoices):
    BLOCKLIST = "blocklist", "Local block-list of words and patterns"
    OPENAI = "openai", "OpenAI moderation API (through a provider in the catalog)"


class ModerationAction(models.TextChoices):
    BLOCK = "block", "Block (400 content_policy_violation; a stream is cut)"
    FLAG = "flag", "Flag (served; recorded on the ledger row and in the audit log)"


class ModerationPolicy(models.Model):
    """What is checked, how, and what happens to a hit. Attached to plans and models; a request is checked
    by the policy of its model and the policy of its user's plan (both, when both are set)."""

    name = models.CharField(max_length=64, unique=True)
    checker = models.CharField(max_length=16, choices=ModerationChecker.choices, default=ModerationChecker.BLOCKLIST)
    blocklist = models.TextField(
        blank=True,
        help_text="One entry a line: a word or phrase (matched as whole words, any case), or re:<regular expression>.",
    )
    moderation_provider = models.ForeignKey(
        Provider,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="For the OpenAI checker: the provider whose /v1/moderations is called.",
    )
    moderation_model = models.CharField(max_length=128, blank=True, default="omni-moderation-latest")
    categories = models.JSONField(
        default=list, blank=True, help_text="For the OpenAI checker: the categories that count; empty: any flagged."
    )
    check_input = models.BooleanField(default=True)
    check_output = models.BooleanField(default=True)
    action = models.CharField(max_length=8, choices=ModerationAction.choices, default=ModerationAction.BLOCK)
    stream_interval_chars = models.PositiveIntegerField(
        default=200,
        help_text="On streams, the reply so far is checked every this many characters and at the end (a "
        "blocking block-list checks every piece).",
    )
    fail_open = models.BooleanField(
        default=False,
        help_text="When the moderation service fails: serve anyway (recorded), instead of refusing the request.",
    )
    timeout_seconds = models.DecimalField(max_digits=5, decimal_places=1, default=Decimal("5.0"))
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "moderation policies"

    def __str__(self) -> str:
        return self.name


class EncryptionRotation(models.Model):
    """Progress of re-encrypting one encrypted column under the newest key (``provider_rotate_encryption``),
    written in the same transaction as each batch, so that a run stopped by a crash resumes after the last
    batch it committed. ``key_id`` names the key the column is being moved to (a one-way fingerprint, not the
    key): a new first key in ``FIELD_ENCRYPTION_KEYS`` starts the column over."""

    column = models.CharField(max_length=200, unique=True, help_text="app_label.Model.field")
    key_id = models.CharField(max_length=16, help_text="Fingerprint of the key the column is moved to.")
    last_pk = models.CharField(max_length=64, blank=True, help_text="The last row done; empty: none yet.")
    rows_done = models.PositiveBigIntegerField(default=0)
    rows_total = models.PositiveBigIntegerField(default=0)
    rows_rewritten = models.PositiveBigIntegerField(default=0, help_text="Rows done that held a value.")
    runs = models.PositiveIntegerField(default=0, help_text="Runs that worked on it: more than one, it was resumed.")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["column"]

    def __str__(self) -> str:
        return f"{self.column}: {self.rows_done}/{self.rows_total}"
