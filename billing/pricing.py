"""The one place a request's cost is computed: tokens × the catalog's prices per million tokens (× the deployment's
factor of the service tier the request was served at: OpenAI's priority and flex), and the web searches a provider
reports (Anthropic's server tool) × the catalog's price per 1,000.

``_exact_parts`` is the formula; ``cost_for`` (the ledger) is the sum of its parts, ``prompt_cost_ceiling``
(reservations) the most a prompt may cost before its usage is known, and ``cost_breakdown`` the parts
themselves, for the cost calculator (``/api/cost/estimate``) and the ledger's admin."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Context, Decimal, localcontext
from typing import Protocol

MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1_000)
# The ledger keeps 10 decimal places: a millionth of a cent is far below any price step.
COST_QUANTUM = Decimal("0.0000000001")
# Wide enough that no token count a request can carry makes the quantized cost overflow the precision
# (the default 28 digits leave 18 above the 10 decimal places: quantize would raise InvalidOperation).
_COST_CONTEXT = Context(prec=80)


class Prices(Protocol):
    """What pricing reads of a model: a catalog ``ResolvedModel`` (bound to a deployment with ``on``, or the
    highest prices of its deployments when unbound) or a ``providers.models.Deployment`` row."""

    @property
    def input_per_mtok(self) -> Decimal: ...
    @property
    def output_per_mtok(self) -> Decimal: ...
    @property
    def cached_input_per_mtok(self) -> Decimal | None: ...
    @property
    def cache_write_per_mtok(self) -> Decimal | None: ...
    @property
    def cache_write_1h_per_mtok(self) -> Decimal | None: ...
    @property
    def web_search_per_1k(self) -> Decimal: ...
    @property
    def priority_price_factor(self) -> Decimal | None: ...
    @property
    def flex_price_factor(self) -> Decimal | None: ...


# OpenAI's service tiers priced apart from the standard one (``default``, which ``auto`` and ``scale`` are billed
# at too): what the reply's ``service_tier`` says the request was served at.
PRIORITY = "priority"
FLEX = "flex"
_ONE = Decimal(1)


# OpenAI's ``fast`` (its Fast mode) is its Priority processing asked by another name: a reply to it says
# ``priority`` (the spec's ServiceTier).
FAST = "fast"


def charged_tier(service_tier: object) -> str:
    """The tier a request served (or asked) at ``service_tier`` is priced at: ``priority`` (``fast`` too), ``flex``,
    or ``""`` for the standard prices (``default``, ``auto``, ``scale``, none, anything else)."""
    if service_tier == FAST:
        return PRIORITY
    return service_tier if service_tier in (PRIORITY, FLEX) else ""  # type: ignore[return-value]


def tier_factor(model: Prices, service_tier: object) -> Decimal:
    """What every token price is multiplied by at ``service_tier``: the deployment's factor of that tier, 1 for the
    standard tier and for a tier it has no factor of."""
    tier = charged_tier(service_tier)
    factor = model.priority_price_factor if tier == PRIORITY else model.flex_price_factor if tier == FLEX else None
    return _ONE if factor is None else factor


# The tiers OpenAI may serve a request at, by the tier it asks: a priority request past its ramp limits is served
# at default (and billed so), a flex one at flex or default; ``auto`` (or none) is the project's default tier,
# which its owner may have set to priority or flex; Anthropic's ``standard_only`` is its standard processing.
_SERVABLE = {PRIORITY: ("", PRIORITY), FAST: ("", PRIORITY), FLEX: ("", FLEX), "default": ("",), "standard_only": ("",)}


# A message's usage's ``service_tier`` (/v1/messages) as the tier it says the request was served at, in OpenAI's
# words: Anthropic's ``standard`` and ``priority`` (its Priority Tier), and ``batch``, which a translated OpenAI reply
# served at Flex processing says (``providers.adapters.translate_anthropic.messages_tier``: Anthropic has no word for
# flex, whose price is OpenAI's Batch API's, as Anthropic's batch tier is its half-price Message Batches, which
# llmhub does not send a Claude deployment): charged flex, the deployment's factor of its half-price tier.
_MESSAGE_TIERS = {"standard": "default", PRIORITY: PRIORITY, "batch": FLEX}


def message_tier(said: object) -> str:
    """The tier a message's usage says (``said``: its ``service_tier``) the request was served at, as a chat
    completion's reply says it (``default``, ``priority``, ``flex``); "" when it says none of them."""
    return _MESSAGE_TIERS.get(said, "") if isinstance(said, str) else ""


def reserved_tier(model: Prices, requested: object) -> str:
    """The tier whose prices a reservation holds for a request asking ``requested`` (its body's ``service_tier``):
    the dearest of those the provider may serve it at, so that whatever tier its reply says, its cost is within
    what admission held."""
    servable = _SERVABLE.get(requested, ("", PRIORITY, FLEX)) if isinstance(requested, str) else ("", PRIORITY, FLEX)
    return max(servable, key=lambda tier: tier_factor(model, tier))


def billed_tier(model: Prices, served: object, requested: object) -> str:
    """The tier a request asking ``requested`` (its body's ``service_tier``) is charged at when its reply says it was
    served at ``served``: that one (``charged_tier``), unless it is dearer than every tier the request may be served
    at, so dearer than its reservation (a compatible server, or a project setting, answering ``default`` at
    priority; OpenAI serves a request at the tier asked or a cheaper one): then the dearest of those
    (``reserved_tier``), so that a budget holds. The client asked for no dearer tier, and is not charged one."""
    ceiling = reserved_tier(model, requested)
    return charged_tier(served) if tier_factor(model, served) <= tier_factor(model, ceiling) else ceiling


def cache_write_price(model: Prices) -> Decimal:
    """What a prompt token written to the provider's cache costs per million: the catalog's cache-write price,
    or the input price when it has none."""
    return model.input_per_mtok if model.cache_write_per_mtok is None else model.cache_write_per_mtok


def cache_write_1h_price(model: Prices) -> Decimal:
    """What a prompt token written to Anthropic's 1-hour cache costs per million: the catalog's 1-hour price, or
    the other cache writes' (``cache_write_price``) when it has none."""
    return cache_write_price(model) if model.cache_write_1h_per_mtok is None else model.cache_write_1h_per_mtok


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    """A request's cost in its parts. ``input_tokens`` includes the cached ones and those written to the cache
    (OpenAI's convention, as the ledger's ``prompt_tokens``); ``input_cost`` prices the others.
    ``cache_write_tokens`` includes those written to the 1-hour cache, and ``cache_write_cost`` prices them all;
    ``cache_write_1h_cost`` is the 1-hour writes' share of it. Each part and the total are rounded to the
    ledger's 10 decimal places separately, so the parts may differ from the total in the last place."""

    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    input_cost: Decimal
    cached_input_cost: Decimal
    cache_write_cost: Decimal
    output_cost: Decimal
    total_cost: Decimal
    cache_write_1h_tokens: int = 0
    cache_write_1h_cost: Decimal = Decimal(0)
    web_search_requests: int = 0
    web_search_cost: Decimal = Decimal(0)
    service_tier: str = ""  # ``charged_tier``: priority, flex, or "" (standard)
    price_factor: Decimal = _ONE  # what the tier multiplied every token price by (``tier_factor``)


def _exact_parts(
    model: Prices,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    cache_write_tokens: int,
    cache_write_1h_tokens: int,
    factor: Decimal = _ONE,
) -> tuple[int, int, int, Decimal, Decimal, Decimal, Decimal, Decimal]:
    """The formula: (cached, cache-write and 1-hour cache-write tokens, input, cached input, cache write (both
    durations), its 1-hour share, output cost), unrounded; call inside ``_COST_CONTEXT``. Cached prompt tokens
    and those written to the cache are part of ``prompt_tokens``, each priced at its own rate when the catalog
    has one (else at the input rate); the 1-hour writes are part of the writes, at their own rate if any.
    ``factor``: the service tier's (``tier_factor``), of every token price."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    written = min(max(cache_write_tokens, 0), prompt_tokens - cached)
    written_1h = min(max(cache_write_1h_tokens, 0), written)
    cached_price = model.input_per_mtok if model.cached_input_per_mtok is None else model.cached_input_per_mtok
    per_token = factor / MILLION
    write_1h_cost = Decimal(written_1h) * cache_write_1h_price(model) * per_token
    return (
        cached,
        written,
        written_1h,
        Decimal(prompt_tokens - cached - written) * model.input_per_mtok * per_token,
        Decimal(cached) * cached_price * per_token,
        Decimal(written - written_1h) * cache_write_price(model) * per_token + write_1h_cost,
        write_1h_cost,
        Decimal(completion_tokens) * model.output_per_mtok * per_token,
    )


def web_search_cost(model: Prices, web_search_requests: int) -> Decimal:
    """What ``web_search_requests`` web searches cost at the catalog's price per 1,000, unrounded; call inside
    ``_COST_CONTEXT``."""
    return Decimal(max(web_search_requests, 0)) * model.web_search_per_1k / THOUSAND


def cost_for(
    *,
    model: Prices,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    web_search_requests: int = 0,
    service_tier: str = "",
) -> Decimal:
    """The cost the ledger records and reservations hold: the sum of the parts, rounded once. On every
    request, so it builds no ``CostBreakdown``. ``service_tier``: the tier the request was served at (its reply's,
    else the one it asked), whose factor prices its tokens (``tier_factor``); not its web searches, a tool's price
    per call whatever the tier."""
    with localcontext(_COST_CONTEXT):
        _, _, _, input_cost, cached_cost, write_cost, _, output_cost = _exact_parts(
            model,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            cache_write_tokens,
            cache_write_1h_tokens,
            tier_factor(model, service_tier),
        )
        searches = web_search_cost(model, web_search_requests) if web_search_requests else Decimal(0)
        return (input_cost + cached_cost + write_cost + output_cost + searches).quantize(COST_QUANTUM)


def prompt_price_ceiling(model: Prices) -> Decimal:
    """The dearest price per million a prompt token may be charged, at the standard tier: the input, cache-write
    or 1-hour cache-write price (which applies is known only from the usage)."""
    return max(model.input_per_mtok, cache_write_price(model), cache_write_1h_price(model))


def prompt_cost_ceiling(
    *, model: Prices, prompt_tokens: int, completion_tokens: int, service_tier: str = ""
) -> Decimal:
    """What a request of ``prompt_tokens`` may cost at most, before its usage says which of them the provider
    read from or wrote to its cache: every prompt token at the dearest of the input, cache-write and 1-hour
    cache-write prices (a reservation that holds this keeps a budget whatever the cache does), at the prices of
    ``service_tier`` (``reserved_tier``: the dearest one the request may be served at)."""
    dearest = prompt_price_ceiling(model)
    written = prompt_tokens if dearest > model.input_per_mtok else 0
    written_1h = written if cache_write_1h_price(model) == dearest else 0
    return cost_for(
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cache_write_tokens=written,
        cache_write_1h_tokens=written_1h,
        service_tier=service_tier,
    )


def cost_breakdown(
    *,
    model: Prices,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    web_search_requests: int = 0,
    service_tier: str = "",
) -> CostBreakdown:
    """The same cost in its parts; ``total_cost`` is exactly what ``cost_for`` answers."""
    factor = tier_factor(model, service_tier)
    with localcontext(_COST_CONTEXT):
        cached, written, written_1h, input_cost, cached_cost, write_cost, write_1h_cost, output_cost = _exact_parts(
            model, prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, cache_write_1h_tokens, factor
        )
        searches = max(web_search_requests, 0)
        search_cost = web_search_cost(model, searches)
        return CostBreakdown(
            input_tokens=prompt_tokens,
            cached_input_tokens=cached,
            cache_write_tokens=written,
            output_tokens=completion_tokens,
            input_cost=input_cost.quantize(COST_QUANTUM),
            cached_input_cost=cached_cost.quantize(COST_QUANTUM),
            cache_write_cost=write_cost.quantize(COST_QUANTUM),
            output_cost=output_cost.quantize(COST_QUANTUM),
            total_cost=(input_cost + cached_cost + write_cost + output_cost + search_cost).quantize(COST_QUANTUM),
            cache_write_1h_tokens=written_1h,
            cache_write_1h_cost=write_1h_cost.quantize(COST_QUANTUM),
            web_search_requests=searches,
            web_search_cost=search_cost.quantize(COST_QUANTUM),
            service_tier=charged_tier(service_tier),
            price_factor=factor,
        )
