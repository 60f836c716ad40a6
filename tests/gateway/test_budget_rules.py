"""A parameter rule's ``fixed`` value may raise what a deployment is sent (``max_tokens``, ``n``) above what the
client asked: admission reserves for what is sent, so the key's budget holds (``docs/ledger.md``)."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest
from django.db.models import Sum

from billing.models import BudgetPeriod, UsageRecord, UsageStatus
from billing.services.budgets import api_key_limits_set
from providers.models import CatalogModel, ModelMode, Provider
from tests.factories import ModelFactory
from tests.gateway.test_ledger import settle_quietly
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

BUDGET = Decimal("0.0002")  # the prompt below and about 200 of the 400 output tokens it may be answered with
WORDS = " ".join(f"w{i}" for i in range(400))  # echoed back: about 400 output tokens, when max_tokens lets it


def _spend(gateway, rules: dict, **params) -> None:
    CatalogModel.objects.filter(name="gpt-test").update(parameter_rules=rules)
    api_key_limits_set(api_key=gateway.api_key, budget_usd=BUDGET, budget_period=BudgetPeriod.MONTHLY)
    try:
        raw = gateway.client().chat.completions.with_raw_response.create(
            **{"model": "gpt-test", **params}, messages=[{"role": "user", "content": WORDS}]
        )
        wait_for_record(raw.headers["x-request-id"])
    except openai.RateLimitError as refused:
        assert refused.code == "insufficient_quota"
        assert gateway.upstream.requests == []
    settle_quietly()
    spent = UsageRecord.objects.filter(api_key=gateway.api_key).aggregate(total=Sum("cost"))["total"]
    assert UsageRecord.objects.filter(api_key=gateway.api_key).count() == 1
    assert spent <= BUDGET, f"the key spent {spent} of a budget of {BUDGET}"


def test_a_fixed_max_tokens_above_the_clients_is_reserved(gateway):
    _spend(gateway, {"fixed": {"max_tokens": 2000}}, max_tokens=1)


def test_a_fixed_max_tokens_is_reserved_when_the_client_sets_none(gateway):
    # Under a budget llmhub picks max_tokens for the request, and the rule then replaces it.
    _spend(gateway, {"fixed": {"max_tokens": 2000}})


def test_a_fixed_limit_reached_by_a_rename_is_reserved(gateway):
    _spend(
        gateway,
        {"rename": {"max_tokens": "max_completion_tokens"}, "fixed": {"max_completion_tokens": 2000}},
        max_tokens=1,
    )


def test_a_fixed_n_above_the_clients_is_reserved(gateway):
    _spend(gateway, {"fixed": {"n": 8}}, max_tokens=60, n=1)


def test_a_fixed_max_tokens_of_a_fallback_is_reserved(gateway):
    # The model asked for has no rule and fails; its fallback's rule raises the limit it is sent.
    CatalogModel.objects.filter(name="broken").update(fallbacks=["gpt-test"])
    _spend(gateway, {"fixed": {"max_tokens": 2000}}, model="broken", max_tokens=1)


# A rule that drops the output limit sends the deployment none: it may write all the model writes at most (the
# catalog's ``max_output_tokens``; the fake's fake-gpt-4o-mini writes up to 16384), which is what is reserved.
MOST = 16384


def _writes_at_most(name: str, limit: int | None) -> None:
    CatalogModel.objects.filter(name=name).update(max_output_tokens=limit)


def test_a_dropped_max_tokens_is_reserved_at_what_the_model_writes_at_most(gateway):
    _writes_at_most("gpt-test", MOST)
    _spend(gateway, {"drop": ["max_tokens"]}, max_tokens=1)


def test_a_dropped_max_tokens_is_reserved_when_the_client_sets_none(gateway):
    # Under a budget llmhub picks max_tokens for the request, and the rule then drops it.
    _writes_at_most("gpt-test", MOST)
    _spend(gateway, {"drop": ["max_tokens"]})


def test_a_dropped_max_completion_tokens_is_reserved(gateway):
    _writes_at_most("gpt-test", MOST)
    _spend(gateway, {"drop": ["max_completion_tokens"]}, max_completion_tokens=1)


def test_a_limit_renamed_then_dropped_is_reserved(gateway):
    _writes_at_most("gpt-test", MOST)
    _spend(
        gateway,
        {"rename": {"max_tokens": "max_completion_tokens"}, "drop": ["max_completion_tokens"]},
        max_tokens=1,
    )


def test_a_dropped_max_tokens_of_a_fallback_is_reserved(gateway):
    # The model asked for has no rule and fails; its fallback's rule sends no limit at all.
    CatalogModel.objects.filter(name="broken").update(fallbacks=["gpt-test"])
    _writes_at_most("gpt-test", MOST)
    _spend(gateway, {"drop": ["max_tokens"]}, model="broken", max_tokens=1)


def test_the_limit_reserved_for_a_fallbacks_dropped_limit_is_sent_to_the_model_asked_for(gateway):
    # gpt-test has no rule and answers; its fallback's rule drops the limit, and the fallback writes at most 100
    # tokens: those 100 are reserved, and the model asked for (no limit set by the client) is sent them.
    ModelFactory(
        name="gpt-dropping",
        provider=Provider.objects.get(name="fake-openai"),
        upstream_id="fake-gpt-4o-mini",
        max_output_tokens=100,
        parameter_rules={"drop": ["max_tokens"]},
    )
    CatalogModel.objects.filter(name="gpt-test").update(fallbacks=["gpt-dropping"])
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.01"), budget_period=BudgetPeriod.MONTHLY)

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": WORDS}]
    )
    record = wait_for_record(raw.headers["x-request-id"])

    assert gateway.upstream.requests[-1]["body"]["max_tokens"] == 100
    assert raw.parse().usage.completion_tokens == 100
    settle_quietly()
    assert UsageRecord.objects.filter(api_key=gateway.api_key).count() == 1
    assert record.completion_tokens == 100


def test_a_dropped_limit_of_a_model_with_no_most_is_refused_under_a_budget(gateway):
    # Nothing bounds the reply, so nothing bounds the spend: the model's configuration is wrong, and the client is
    # told so, before anything goes upstream.
    CatalogModel.objects.filter(name="gpt-test").update(parameter_rules={"drop": ["max_tokens"]})
    api_key_limits_set(api_key=gateway.api_key, budget_usd=BUDGET, budget_period=BudgetPeriod.MONTHLY)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": WORDS}], max_tokens=1
        )

    assert refused.value.status_code == 400
    assert refused.value.code == "model_output_unbounded"
    message = refused.value.message
    assert "gpt-test" in message and "max_output_tokens" in message and "administrator" in message
    assert gateway.upstream.requests == []
    settle_quietly()
    rows = UsageRecord.objects.filter(api_key=gateway.api_key)
    assert [(row.status, row.cost) for row in rows] == [(UsageStatus.REJECTED, Decimal(0))]


def test_a_dropped_limit_of_a_fallback_with_no_most_is_refused_under_a_budget(gateway):
    CatalogModel.objects.filter(name="broken").update(fallbacks=["gpt-test"])
    CatalogModel.objects.filter(name="gpt-test").update(parameter_rules={"drop": ["max_tokens"]})
    api_key_limits_set(api_key=gateway.api_key, budget_usd=BUDGET, budget_period=BudgetPeriod.MONTHLY)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])

    assert refused.value.code == "model_output_unbounded"
    assert "`gpt-test`" in refused.value.message
    assert gateway.upstream.requests == []


def test_a_dropped_limit_without_a_budget_changes_nothing(gateway):
    # No budget: nothing to bound, and the model is answered without a limit, as its rule says.
    CatalogModel.objects.filter(name="gpt-test").update(parameter_rules={"drop": ["max_tokens"]})

    completion = gateway.client().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": WORDS}], max_tokens=1
    )

    assert "max_tokens" not in gateway.upstream.requests[-1]["body"]
    assert completion.usage.completion_tokens > 1


def test_a_drop_rule_of_an_embedding_model_is_no_unbounded_output(gateway):
    # An embedding writes no tokens: nothing is sent as an output limit, and a rule dropping one bounds nothing.
    ModelFactory(
        name="embed-test",
        provider=Provider.objects.get(name="fake-openai"),
        upstream_id="fake-embedding-small",
        mode=ModelMode.EMBEDDING,
        output_per_mtok=Decimal(0),
        parameter_rules={"drop": ["max_tokens"]},
    )
    api_key_limits_set(api_key=gateway.api_key, budget_usd=BUDGET, budget_period=BudgetPeriod.MONTHLY)

    raw = gateway.client().embeddings.with_raw_response.create(model="embed-test", input="one two three")

    assert len(raw.parse().data) == 1
    assert wait_for_record(raw.headers["x-request-id"]).status == UsageStatus.OK


# A tokens-per-minute limit counts the tokens a request uses: the client's own output limit when it sets one (as
# OpenAI's limits do), else the prompt, the rest when it settles. A limit a rule puts in place of the client's (a
# ``fixed`` one, or the catalog's most for a dropped one under a budget) is reserved against budgets, not counted in
# the windows: a key whose tpm limit is below it would be refused though its real use fits.
TPM = 2000


@pytest.mark.parametrize("client_limit", [{}, {"max_tokens": 5}], ids=["no-limit", "limit"])
def test_a_dropped_limit_under_a_budget_counts_in_the_tpm_window_what_is_used(gateway, client_limit):
    _writes_at_most("gpt-test", MOST)
    CatalogModel.objects.filter(name="gpt-test").update(parameter_rules={"drop": ["max_tokens"]})
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("1"), budget_period=BudgetPeriod.MONTHLY, tpm=TPM)
    client = gateway.client()

    for _ in range(2):  # the second one too: the first one's window entry is what it used, not the model's most
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "one two [[reply=three four]]"}], **client_limit
        )
        assert raw.parse().choices[0].message.content == "three four"
        wait_for_record(raw.headers["x-request-id"])

    assert "max_tokens" not in gateway.upstream.requests[-1]["body"]


def test_a_fixed_limit_without_a_budget_counts_in_the_tpm_window_what_is_used(gateway):
    CatalogModel.objects.filter(name="gpt-test").update(parameter_rules={"fixed": {"max_tokens": TPM + 1000}})
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, tpm=TPM)
    client = gateway.client()

    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "one two [[reply=three four]]"}]
        )
        assert raw.parse().choices[0].message.content == "three four"
        wait_for_record(raw.headers["x-request-id"])

    # Without a budget llmhub sends no limit of its own, which the rule would fix: the deployment is sent none.
    assert "max_tokens" not in gateway.upstream.requests[-1]["body"]
