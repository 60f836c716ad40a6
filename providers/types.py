"""Immutable snapshots of catalog rows, safe to cache in-process and share between coroutines."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from .fields import Secret

# Header names that say their value is a credential (``Authorization``, ``api-key``, ``x-goog-api-key``, a gateway's
# ``cf-aig-authorization``, ``Helicone-Auth``…), and those that name an account (``OpenAI-Organization``,
# ``OpenAI-Project``, an ``X-Account-Id``, a tenant or workspace).
_CREDENTIAL_HEADER = re.compile(r"auth|key|token|secret|cookie|password", re.IGNORECASE)
_ACCOUNT_HEADER = re.compile(r"organi[sz]ation|project|account|tenant|workspace", re.IGNORECASE)


def credential_header(name: str) -> bool:
    """Whether a header of that name carries a credential: its value is a secret (a catalog dump writes it as a
    ``${VAR}`` reference)."""
    return bool(_CREDENTIAL_HEADER.search(name))


def platform_header(name: str) -> bool:
    """Whether a provider's extra header of that name is the platform's own: a credential, or the platform's
    account or project. Not sent with a user's own key (``ProviderConfig.on_user_key``): it would go where the
    user's traffic is billed, and could run the user's request on the platform's account."""
    return credential_header(name) or bool(_ACCOUNT_HEADER.search(name))


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    id: int
    name: str
    kind: str
    base_url: str
    api_key: Secret = field(repr=False)
    organization: str = ""
    # Decrypted, as the SDK client sends them; they may carry a credential, so no repr shows them.
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    timeout: float = 60.0
    enabled: bool = True
    version: datetime | None = None  # the row's updated_at: a changed config builds a new client
    api_version: str = ""  # Azure OpenAI's api-version, Gemini's (v1beta); empty: the adapter's default
    byok: str = "disabled"  # ``ByokMode``: whether users' own keys may replace ``api_key``
    # Set when ``api_key`` is a user's own key (``providers.byok.byok_bind``): its row and visible hint.
    credential_id: int | None = None
    credential_hint: str = ""

    def on_user_key(self, api_key: Secret, *, credential_id: int | None, hint: str) -> ProviderConfig:
        """This provider with a user's own key in place of its own (bring your own key), and without its
        ``organization``: that is the platform's account, which OpenAI refuses a key of another account with
        (401 ``mismatched_organization``). Nor with its extra headers that are the platform's
        (``platform_header``): an ``Authorization`` there would replace the user's key. Both a request on the
        user's key (``byok.byok_bind``) and the key's check (``services.credentials.key_live_acheck``) go
        through here."""
        headers = tuple((name, value) for name, value in self.extra_headers if not platform_header(name))
        return replace(
            self,
            api_key=api_key,
            organization="",
            extra_headers=headers,
            credential_id=credential_id,
            credential_hint=hint,
        )

    @property
    def pool_key(self) -> tuple[int, int | None]:
        """One pooled client per provider and per user credential (``adapters.registry``)."""
        return (self.id, self.credential_id)

    @property
    def cache_key(self) -> tuple[Any, ...]:
        """Everything that shapes the SDK client; two configs with the same key share one client."""
        return (
            self.kind,
            self.base_url,
            self.api_key.reveal(),
            self.organization,
            self.extra_headers,
            self.timeout,
            self.api_version,
        )


class RoutingStrategy:
    """How a model picks among its deployments (``providers.routing``)."""

    WEIGHTED = "weighted"
    PRIORITY = "priority"
    LOWEST_LATENCY = "lowest_latency"
    LEAST_BUSY = "least_busy"
    CHEAPEST = "cheapest"


@dataclass(frozen=True, slots=True)
class ResolvedDeployment:
    """One place a public model is served: a provider, the provider's model id, and that deployment's prices
    and routing settings."""

    id: int
    name: str  # unique within its model; what ``x-llmhub-deployment`` says
    provider: ProviderConfig
    upstream_id: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    cache_write_1h_per_mtok: Decimal | None = None
    web_search_per_1k: Decimal = Decimal(0)  # per 1,000 web searches (Anthropic's server tool)
    # The upstream model searches the web before every answer, asked or not (OpenAI's search models): each request
    # is one search (``Deployment.searches_on_every_request``).
    searches_every_request: bool = False
    # OpenRouter runs its web plugin on every request (an upstream id ending ``:online``): its results are billed
    # (``providers.tokens.web_plugin_results``).
    web_plugin_online: bool = False
    priority_price_factor: Decimal | None = None  # the token prices × this at OpenAI's priority tier; None: × 1
    flex_price_factor: Decimal | None = None  # the token prices × this at OpenAI's flex tier; None: × 1
    weight: int = 1
    priority: int = 0
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    quality: float | None = None  # set by admins (later fed by experiments): ``x-llmhub-route: quality``
    forced_state: str = ""  # "" (the breaker decides), "open" or "closed": an admin's override
    # Since when the provider's model list has lacked ``upstream_id`` (the health round): a 404 for it then is
    # the catalog's mistake, not the account's, whichever key asked (``upstream_model_missing``).
    upstream_model_missing_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A public model, as clients name it, with the deployments that serve it.

    ``upstream_id``, ``provider`` and the prices are those of ``deployment`` once the snapshot is bound to
    one (``on``: what an adapter and the pricing of one attempt see). Unbound (``deployment`` is None), the
    prices are the highest of its deployments (what a reservation must cover) and ``provider`` /
    ``upstream_id`` are those of its first deployment in priority order (``owned_by``)."""

    id: int
    name: str
    upstream_id: str
    provider: ProviderConfig
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None
    context_window: int
    max_output_tokens: int | None
    mode: str = "chat"  # ``ModelMode``: which endpoints the model answers (chat, embedding)
    supports_streaming: bool = True
    supports_tools: bool = True
    supports_vision: bool = False
    supports_json_mode: bool = True
    supports_reasoning: bool = False  # takes ``reasoning_effort``: the chat page offers its effort control
    parameter_rules: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    label: str = ""
    deployments: tuple[ResolvedDeployment, ...] = ()
    deployment: ResolvedDeployment | None = None  # the one this snapshot is bound to
    strategy: str = RoutingStrategy.WEIGHTED
    retries: int = 2  # further attempts among this model's deployments after the first
    fallbacks: tuple[str, ...] = ()  # other public names, tried in order once the deployments are exhausted
    context_window_fallbacks: tuple[str, ...] = ()  # tried instead when the prompt is too long for this one
    resume_on_failure: bool = False
    stream_idle_timeout: float | None = None  # seconds without a chunk that end a stream; None: the setting
    moderation_policy_id: int | None = None  # ``ModerationPolicy`` checking this model's input and output
    cache_write_per_mtok: Decimal | None = None  # prompt-cache writes; None: priced as input
    cache_write_1h_per_mtok: Decimal | None = None  # Anthropic's 1-hour cache writes; None: as the other writes
    web_search_per_1k: Decimal = Decimal(0)  # per 1,000 web searches the provider reports
    # Bound: the deployment's; unbound, any of them (what a reservation must cover).
    searches_every_request: bool = False
    web_plugin_online: bool = False  # OpenRouter's ``:online``; bound: the deployment's; unbound, any of them
    priority_price_factor: Decimal | None = None  # OpenAI's priority tier: the token prices × this; None: × 1
    flex_price_factor: Decimal | None = None  # OpenAI's flex tier: the token prices × this; None: × 1

    def on(self, deployment: ResolvedDeployment) -> ResolvedModel:
        """This model as served by ``deployment``: its provider, upstream id and prices. The same snapshot
        bound to the same deployment gives the same object (``_bound``): building it (``replace`` through
        the 26 fields' ``__init__``) was a per-request cost, and both are immutable."""
        key = (id(self), id(deployment))
        held = _bound.get(key)
        # The entry holds both objects, so neither id can be reused by another object while it is kept.
        if held is not None and held[0] is self and held[1] is deployment:
            return held[2]
        bound = replace(
            self,
            upstream_id=deployment.upstream_id,
            provider=deployment.provider,
            input_per_mtok=deployment.input_per_mtok,
            output_per_mtok=deployment.output_per_mtok,
            cached_input_per_mtok=deployment.cached_input_per_mtok,
            cache_write_per_mtok=deployment.cache_write_per_mtok,
            cache_write_1h_per_mtok=deployment.cache_write_1h_per_mtok,
            web_search_per_1k=deployment.web_search_per_1k,
            searches_every_request=deployment.searches_every_request,
            web_plugin_online=deployment.web_plugin_online,
            priority_price_factor=deployment.priority_price_factor,
            flex_price_factor=deployment.flex_price_factor,
            deployment=deployment,
        )
        if len(_bound) >= _BOUND_MAX:
            _bound.clear()  # snapshots the catalog replaced are let go with the rest; the live ones come back
        _bound[key] = (self, deployment, bound)
        return bound


# ``ResolvedModel.on``'s results: (id of the snapshot, id of the deployment) -> (snapshot, deployment, bound).
# A catalog holds a few hundred (model, deployment) pairs at most; a reload makes new snapshots, and the old
# ones' entries go at the next clear.
_BOUND_MAX = 4096
_bound: dict[tuple[int, int], tuple[ResolvedModel, ResolvedDeployment, ResolvedModel]] = {}


@dataclass(frozen=True, slots=True)
class UpstreamModel:
    """A model as the provider lists it."""

    id: str
    owned_by: str = ""
    display_name: str = ""
    context_window: int | None = None


@dataclass(frozen=True, slots=True)
class HealthResult:
    ok: bool
    latency_ms: int
    error: str = ""
    models_seen: int | None = None
