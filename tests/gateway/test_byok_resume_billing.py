"""A stream resumed across keys: cut midway on one payer's provider key (the platform's, or the user's own) and
continued on the other's. Each attempt is a request its provider billed to the account whose key it went with, so
the ledger row's ``cost`` (what the platform's budgets count) holds the attempts on the platform's key (all of them
when the plan counts own-key spend), and its ``user_key_cost``, set when any attempt ran on the user's own key, the
whole price (``docs/byok.md``, "Who pays"). Until 7 December 2026 the whole row went to the payer of the attempt
that answered: a stream cut on the platform's key and resumed on the user's own cost the platform's budgets nothing,
though the platform paid the cut attempt, and one the other way round charged the user's own-key attempt to the
platform's budgets."""

from __future__ import annotations

import anthropic
import pytest

from billing.models import BillingSource, Plan, UsageRecord
from billing.pricing import cost_for
from billing.selectors import experiment_usage_sums
from billing.services.plans import plan_assign
from providers.models import CatalogModel, Deployment, Provider
from providers.selectors import model_resolve_sync
from providers.tokens import prompt_tokens, text_tokens
from tests.gateway.test_byok import MESSAGES, PRICES, world  # noqa: F401  (a fixture)
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)


def resumed_across(first: str, second: str) -> CatalogModel:
    """``mixed``: the deployment on ``first``'s provider cuts its stream after three chunks, the one on ``second``'s
    answers; same prices, so the split is in tokens alone."""
    catalog = CatalogModel.objects.create(name="mixed", strategy="priority", resume_on_failure=True)
    for position, (provider, upstream) in enumerate(((first, "fault-cut-3"), (second, "fake-gpt-4o-mini"))):
        Deployment.objects.create(
            model=catalog,
            name=f"mixed-{position}",
            provider=Provider.objects.get(name=provider),
            upstream_id=upstream,
            priority=position,
            **PRICES,
        )
    return catalog


def stream_resumed(world, body: dict) -> tuple[str, int]:  # noqa: F811
    """Alice's stream of ``body``, resumed once: its request id and the cut attempt's completion tokens (the reply
    so far, which the resumed attempt was given as its prefill)."""
    with world.client(world.alice_key).chat.completions.with_streaming_response.create(**body) as response:
        list(response.iter_lines())
        request_id = response.headers["x-request-id"]
    prefill = world.upstream.requests[-1]["body"]["messages"][-1]
    assert prefill["role"] == "assistant" and prefill["content"]
    return request_id, text_tokens(prefill["content"])


def priced(record, *, prompt: int, completion: int):
    model = model_resolve_sync("mixed")
    return cost_for(model=model.on(model.deployments[0]), prompt_tokens=prompt, completion_tokens=completion)


BODY = {"model": "mixed", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}


def test_a_stream_cut_on_the_platforms_key_and_resumed_on_the_users_own_costs_the_platform_its_attempt(
    world,  # noqa: F811
):
    resumed_across("platform-openai", "optional-openai")

    request_id, cut_completion = stream_resumed(world, BODY)

    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed and record.attempts == 2
    assert record.billing_source == BillingSource.USER_KEY, "the attempt that answered ran on Alice's key"
    cut_prompt = prompt_tokens({"model": "mixed", "messages": MESSAGES}, operation="chat")
    platform_part = priced(record, prompt=cut_prompt, completion=cut_completion)
    whole = priced(record, prompt=record.prompt_tokens, completion=record.completion_tokens)
    assert platform_part > 0
    assert record.cost == platform_part, "the platform paid the cut attempt: its budgets count it"
    assert record.user_key_cost == whole, "the request's price, whoever paid"


def test_a_stream_cut_on_the_users_own_key_and_resumed_on_the_platforms_costs_the_platform_its_attempt_alone(
    world,  # noqa: F811
):
    resumed_across("optional-openai", "platform-openai")

    request_id, cut_completion = stream_resumed(world, BODY)

    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed and record.attempts == 2
    assert record.billing_source == BillingSource.PLATFORM, "the attempt that answered ran on the platform's key"
    cut_prompt = prompt_tokens({"model": "mixed", "messages": MESSAGES}, operation="chat")
    own_part = priced(record, prompt=cut_prompt, completion=cut_completion)
    whole = priced(record, prompt=record.prompt_tokens, completion=record.completion_tokens)
    assert own_part > 0
    assert record.cost == whole - own_part, "the platform's budgets count its own attempt alone"
    assert record.user_key_cost == whole, "Alice's key paid part of it: the request's price, whoever paid"
    price = UsageRecord.objects.filter(pk=record.pk).aggregate(**experiment_usage_sums())["price"]
    assert price == whole, "an experiment's results read the whole price"


def test_a_plan_counting_own_key_spend_counts_both_attempts_of_a_stream_resumed_across_keys(world):  # noqa: F811
    """The split leaves a plan that counts own-key spend as it was: its budgets count the whole request."""
    counting = Plan.objects.create(name="Counts", allow_all_models=True, byok_counts_against_budget=True)
    plan_assign(user=world.alice, plan=counting)
    resumed_across("platform-openai", "optional-openai")

    request_id, _ = stream_resumed(world, BODY)

    record = wait_for_record(request_id)
    assert record.resumed and record.billing_source == BillingSource.USER_KEY
    whole = priced(record, prompt=record.prompt_tokens, completion=record.completion_tokens)
    assert record.cost == whole, "the plan counts own-key spend: the budgets count the whole request"
    assert record.user_key_cost == whole


def test_a_message_stream_cut_on_the_platforms_key_and_resumed_on_the_users_own_costs_the_platform_its_attempt(
    world,  # noqa: F811
):
    """``/v1/messages`` resumes the same way, and splits alike."""
    resumed_across("platform-openai", "optional-openai")
    client = anthropic.Anthropic(base_url=world.url, api_key=world.alice_key, max_retries=0, timeout=30)

    with client.messages.stream(model="mixed", max_tokens=60, messages=MESSAGES) as stream:
        list(stream)
        request_id = stream.response.headers["x-request-id"]

    prefill = world.upstream.requests[-1]["body"]["messages"][-1]
    assert prefill["role"] == "assistant" and prefill["content"]
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed and record.billing_source == BillingSource.USER_KEY
    whole = priced(record, prompt=record.prompt_tokens, completion=record.completion_tokens)
    cut_completion = text_tokens(prefill["content"])
    assert record.cost >= priced(record, prompt=0, completion=cut_completion) > 0, "the platform paid the cut attempt"
    assert record.cost < whole and record.user_key_cost == whole, "Alice's account paid the resumed one"
