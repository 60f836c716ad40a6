"""Settlement, in one place: what a finished request is charged, and its one ledger row.

Whatever ended the request (success, an upstream error, the client gone, a cancel, a shutdown), the entry
point hands over what its call gathered: the provider's usage if it sent one, the text relayed to the
client, the request's body (for the prompt estimate), the model bound to the deployment that answered.
``request_settle`` decides the tokens (reported, or estimated and flagged), prices them at that
deployment's prices (``billing.pricing.cost_for``), and submits the row with the request's admission:
the ledger writer swaps the reservation for the cost and inserts the row (``ledger.usage_record_submit``),
or spools both, so that the replay settles the reservation with the row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from django.utils import timezone

from providers.exceptions import AnsweredCalls
from providers.tokens import COUNT_MAX, prompt_tokens, text_tokens
from providers.types import ResolvedModel

from ..models import BillingSource, Operation, UsageStatus
from ..pricing import billed_tier, charged_tier, cost_for
from .admission import Admission, admission_row_instant
from .ledger import usage_record_submit
from .ledger_rows import UsageData

REQUESTED_MODEL_LENGTH = 128  # UsageRecord.requested_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What the request was charged, as its ledger row says."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    cost: Decimal
    usage_estimated: bool


class CutAttempt(NamedTuple):
    """An attempt of a resumed stream that failed midway (``request_settle``'s ``cut_attempts``): whose provider key
    it ran on (``BillingSource``), and the prompt and completion tokens its provider billed that key's account."""

    billing_source: str
    prompt_tokens: int
    completion_tokens: int


def settlement_tokens(
    *,
    operation: str,
    body: Mapping[str, Any],
    status: str,
    usage: Mapping[str, Any] | None,
    delivered_text: str,
    output_arrived: bool = False,
) -> tuple[int, int, int, int, bool]:
    """(prompt, completion, cached, cache-write tokens, estimated) of a finished request. The cached tokens (read
    from the provider's prompt cache) and the cache-write ones (written to it) are both part of the prompt.

    The provider's usage when it reported one. Otherwise an estimate, flagged: the text relayed to the client
    and, since the provider got as far as producing it, the prompt; an embeddings request that succeeded
    without usage is charged its input. ``output_arrived``: the model wrote something nothing of which was
    relayed (the output check cut the stream on its first words): the prompt is charged, and the completion
    is what was relayed, none. A reply the provider completed (``OK``) that wrote nothing, or nothing llmhub
    counts, is charged its prompt too: the provider billed it (until 7 December 2026 it cost nothing). A request
    that produced nothing (refused upstream, cut before its first token) costs nothing and is not an estimate."""
    reported = _reported(usage, operation)
    if reported is not None:
        prompt, completion, cached, written = reported
        if operation == Operation.EMBEDDINGS:
            return prompt or 0, 0, cached, written, False
        # A usage that counts one of the two and leaves the other out (or unreadable): that one is estimated, as
        # a request without usage is, rather than charged as nothing.
        estimated = prompt is None or completion is None
        if prompt is None:
            prompt = prompt_tokens(body, operation=operation)
        if completion is None:
            completion = text_tokens(delivered_text)
        return prompt, completion, cached, written, estimated
    if operation == Operation.EMBEDDINGS:
        if status == UsageStatus.OK:
            return prompt_tokens(body, operation=operation), 0, 0, 0, True
        return 0, 0, 0, 0, False
    if delivered_text or output_arrived or status == UsageStatus.OK:
        return prompt_tokens(body, operation=operation), text_tokens(delivered_text), 0, 0, True
    return 0, 0, 0, 0, False


def answered_calls_usage(answered: Sequence[AnsweredCalls]) -> tuple[dict[str, int], bool]:
    """(OpenAI-shaped usage, partly estimated) of the calls a failed embeddings request had answered, which the
    provider billed (``ProviderError.answered``): their counted tokens, and an estimate of the inputs of those
    it did not count (Gemini counts none)."""
    counted = sum(calls.tokens for calls in answered if calls.tokens is not None)
    uncounted = [item for calls in answered if calls.tokens is None for item in calls.inputs]
    estimated = prompt_tokens({"input": uncounted}, operation=Operation.EMBEDDINGS) if uncounted else 0
    tokens = counted + estimated
    return {"prompt_tokens": tokens, "total_tokens": tokens}, bool(uncounted)


def _reported(usage: Mapping[str, Any] | None, operation: str) -> tuple[int | None, int | None, int, int] | None:
    """OpenAI-shaped usage (``prompt_tokens``, ``completion_tokens``, ``prompt_tokens_details.cached_tokens``
    and ``.cache_write_tokens``, both counted in ``prompt_tokens``: what ``openai_usage`` makes of Anthropic's
    ``cache_read_input_tokens`` and ``cache_creation_input_tokens``), or None when it counts nothing usable: an
    embeddings usage must count the input, a chat usage the prompt or the completion (the other None when it
    does not count it). A count that is not a non-negative integer a ledger row can hold (``COUNT_MAX``) is no
    count."""
    if not usage:
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if prompt is None and (operation == Operation.EMBEDDINGS or completion is None):
        return None
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, Mapping):
        details = {}
    cached = _count(details.get("cached_tokens"))
    written = _count(details.get("cache_write_tokens"))
    return prompt, completion, cached or 0, written or 0


def _written_1h(usage: Mapping[str, Any] | None, written: int) -> int:
    """Of ``written`` cache-write tokens the provider reported, those to Anthropic's 1-hour cache
    (``prompt_tokens_details.cache_write_1h_tokens``, which ``openai_usage`` makes of its usage's
    ``cache_creation.ephemeral_1h_input_tokens``); none when the usage says nothing of them."""
    details = usage.get("prompt_tokens_details") if usage else None
    if not written or not isinstance(details, Mapping):
        return 0
    return min(_count(details.get("cache_write_1h_tokens")) or 0, written)


def _web_searches(usage: Mapping[str, Any] | None) -> int:
    """The web searches the provider reported and bills apart from the tokens (``web_search_requests``, which
    ``openai_usage`` makes of Anthropic's ``server_tool_use.web_search_requests``); none when it says nothing."""
    return (_count(usage.get("web_search_requests")) or 0) if usage else 0


def _payers_parts(
    cost: Decimal, billing_source: str, elsewhere: Sequence[CutAttempt], model: ResolvedModel, tier: str
) -> tuple[Decimal, Decimal | None]:
    """(the part of a row of price ``cost`` paid on the platform's provider key, its ``user_key_cost``) when its
    answering attempt ran on ``billing_source``'s key and its ``elsewhere`` attempts (cut midway, before a resume) on
    the other payer's: those are priced at the prices and tier the row charges every attempt at, the rest is the
    answering payer's. ``user_key_cost`` is the whole price when any of it ran on the user's own key (what an
    experiment's results read as the request's price, whoever paid), else None."""
    other = Decimal(0)
    if elsewhere:
        other = min(
            cost_for(
                model=model,
                prompt_tokens=min(sum(attempt.prompt_tokens for attempt in elsewhere), COUNT_MAX),
                completion_tokens=min(sum(max(attempt.completion_tokens, 0) for attempt in elsewhere), COUNT_MAX),
                service_tier=tier,
            ),
            cost,
        )
    if billing_source == BillingSource.USER_KEY:
        return other, cost
    return cost - other, (cost if elsewhere else None)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNT_MAX:
        return value
    return None


def request_settle(
    *,
    request_id: str,
    endpoint: str,
    operation: str,
    body: Mapping[str, Any],
    status: str,
    user_id: int,
    api_key_id: int | None,
    model: ResolvedModel,
    admission: Admission | None,
    usage: Mapping[str, Any] | None = None,
    delivered_text: str = "",
    output_arrived: bool = False,
    error_type: str = "",
    requested_model: str = "",
    attempts: int = 0,
    resumed: bool = False,
    usage_partly_estimated: bool = False,
    earlier_prompt_tokens: int = 0,
    web_searches: int = 0,
    upstream_latency_ms: int | None = None,
    ttft_ms: int | None = None,
    duration_ms: int = 0,
    billing_source: str = BillingSource.PLATFORM,
    moderation: str = "",
    experiment_id: int | None = None,
    experiment_variant_id: int | None = None,
    service_tier: str = "",
    requested_tier: object = None,
    cut_attempts: Sequence[CutAttempt] = (),
) -> Settlement:
    """Settle a request that was admitted: decide its tokens and cost, and submit its ledger row with its
    admission (the reservation is released with the row, or both wait in the spool). Synchronous and
    without I/O, so safe in a ``finally`` under cancellation.

    ``model``: bound to the deployment that answered last (``model.on(deployment)``), whose provider and
    prices the row gets; unbound when no call was made. ``usage``: the provider's, OpenAI-shaped, or None.
    ``delivered_text``: what was relayed to the client, for the estimate when there is no usage;
    ``output_arrived``: the model wrote something, relayed or not (``settlement_tokens``).
    ``requested_model``: the name the client sent; the row keeps it only when another model answered.
    ``usage_partly_estimated``: ``usage`` adds counted tokens to the provider's (a resumed stream's first
    part): the row is flagged as an estimate. ``earlier_prompt_tokens``: the prompts of a resumed stream's attempts
    that answered and failed midway, each a request the provider billed (``usage`` and ``delivered_text`` count the
    last attempt's prompt alone): added to the prompt, priced as the rest of it, the row an estimate.
    ``web_searches``: searches the provider ran and bills that
    ``usage`` does not report (a chat completion's ``web_search_options``), added to those it does.
    ``billing_source``: whose provider key paid; on the user's own key the row's ``cost`` counts against budgets
    only when the user's plan says so (``user_key_cost`` keeps the price either way). ``moderation``: what
    moderation found, for the row. ``service_tier``: the tier the provider said it served the request at (OpenAI's
    reply's ``service_tier``), else the one the request asked: its tokens are priced at the deployment's factor of
    it (``pricing.tier_factor``), and the row keeps it (``charged_tier``); ``requested_tier``: the one the request
    asked (its body's ``service_tier``; None: none), whose reservation the tier charged is not dearer than
    (``pricing.billed_tier``: a reply saying a dearer one is charged the dearest the request may be served at, and
    logged). ``cut_attempts``: a resumed stream's attempts that failed midway, whose tokens ``usage``,
    ``delivered_text`` and ``earlier_prompt_tokens`` count with the answering attempt's: the part of the price of
    those that ran on the other payer's key than ``billing_source`` is that payer's, and ``cost`` counts the part on the
    platform's key alone unless the plan counts own-key spend (``_payers_parts``)."""
    prompt, completion, cached, written, estimated = settlement_tokens(
        operation=operation,
        body=body,
        status=status,
        usage=usage,
        delivered_text=delivered_text,
        output_arrived=output_arrived,
    )
    estimated = estimated or (usage_partly_estimated and usage is not None)
    if earlier_prompt_tokens > 0:
        prompt = min(prompt + earlier_prompt_tokens, COUNT_MAX)
        estimated = True
    written_1h = _written_1h(usage, written)
    searches = min(_web_searches(usage) + max(web_searches, 0), COUNT_MAX)
    tier = billed_tier(model, service_tier, requested_tier)
    priced: dict[str, Any] = {
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "cache_write_tokens": written,
        "cache_write_1h_tokens": written_1h,
        "web_search_requests": searches,
    }
    cost = cost_for(**priced, service_tier=tier)
    if tier != charged_tier(service_tier):
        # The provider says it served a dearer tier than the request may be charged: the operator pays the
        # difference, which no reservation held (a compatible server's or a project setting's doing).
        logger.warning(
            "request %s asked service tier %r and %s said it served it at %r: charged at %r, the $%s more not charged",
            request_id,
            requested_tier,
            model.deployment.name if model.deployment is not None else model.name,
            service_tier,
            tier or "default",
            cost_for(**priced, service_tier=service_tier) - cost,
        )
    platform_part, user_key_cost = _payers_parts(
        cost,
        billing_source,
        [attempt for attempt in cut_attempts if attempt.billing_source != billing_source],
        model,
        tier,
    )
    if not (admission is not None and admission.byok_counts_against_budget):
        cost = platform_part
    deployment = model.deployment
    usage_record_submit(
        UsageData(
            request_id=request_id,
            endpoint=endpoint,
            operation=operation,
            stream=bool(body.get("stream")),
            status=status,
            user_id=user_id,
            api_key_id=api_key_id,
            provider_id=model.provider.id,
            model_id=model.id,
            deployment_id=deployment.id if deployment is not None else None,
            provider_name=model.provider.name,
            model_name=model.name,
            deployment_name=deployment.name if deployment is not None else "",
            requested_model=requested_model[:REQUESTED_MODEL_LENGTH] if requested_model != model.name else "",
            attempts=attempts,
            resumed=resumed,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            cache_write_tokens=written,
            cache_write_1h_tokens=written_1h,
            web_search_requests=searches,
            service_tier=tier,
            cost=cost,
            usage_estimated=estimated,
            upstream_latency_ms=upstream_latency_ms,
            ttft_ms=ttft_ms,
            duration_ms=duration_ms,
            error_type=error_type,
            billing_source=billing_source,
            user_key_cost=user_key_cost,
            moderation=moderation[:200],
            experiment_id=experiment_id,
            experiment_variant_id=experiment_variant_id,
            created_at=admission_row_instant(admission, timezone.now()),
        ),
        admission=admission,
    )
    return Settlement(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cache_write_tokens=written,
        cost=cost,
        usage_estimated=estimated,
    )
