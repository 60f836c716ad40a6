"""A key deleted under another keeps counting against the keys above it: its ledger rows and its rollup rows go to
the nearest key above it that stays (it answered for that spend), so the parent's budget still holds what the child
spent after the reconcile puts the counters back on the ledger. A key with no key left above it (a person's key, a
whole tree, a user's keys) leaves its rows without a key, as before.

Both admission stores, the clock pinned in mid-month."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.db.models import Sum
from django.urls import reverse

from billing.exceptions import QuotaExceededError
from billing.models import ApiKey, DailyUsage, DailyUsageSeal, UsageRecord
from billing.services.admission import admission_settle
from billing.services.counters import budget_counters_reconcile
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from billing.services.rollups import daily_usage_rebuild
from providers.selectors import resolved_model
from tests.billing.conftest import FLAT_TOKEN, flat_admitted
from tests.factories import UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

MID_MONTH = datetime(2026, 12, 15, 12, 0, tzinfo=UTC)
BUDGET = 50 * FLAT_TOKEN  # $0.005 a month: 50 completion tokens of the flat model


@pytest.fixture
def clock():
    with time_machine.travel(MID_MONTH, tick=False) as traveller:
        yield traveller


@pytest.fixture
def tree(plans, catalog, clock):
    """A person's key with a monthly budget of 50 tokens, a key under it (``child``) and one under that
    (``grandchild``), each with the same budget."""
    user = UserFactory(username="tree")
    plan_assign(user=user, plan=plans["Enterprise"])
    parent = api_key_create(user=user, name="parent", budget_usd=BUDGET).api_key
    child = api_key_create(user=user, name="child", budget_usd=BUDGET, parent=parent).api_key
    grandchild = api_key_create(user=user, name="grandchild", budget_usd=BUDGET, parent=child).api_key
    return {
        "user": user,
        "parent": parent,
        "child": child,
        "grandchild": grandchild,
        "flat": resolved_model(catalog["flat"]),
    }


def admit(tree, key: ApiKey, request_id: str, tokens: int):
    return async_to_sync(flat_admitted)(tree, request_id, tokens, api_key=key)


def spend(tree, key: ApiKey, request_id: str, tokens: int, *, created_at: datetime | None = None) -> UsageRecord:
    """A request of ``tokens`` completion tokens on ``key``, admitted, settled and written to the ledger."""
    admission = admit(tree, key, request_id, tokens)
    cost = tokens * FLAT_TOKEN
    async_to_sync(admission_settle)(admission=admission, cost=cost, prompt_tokens=0, completion_tokens=tokens, ok=True)
    return UsageRecordFactory(
        request_id=request_id,
        user=tree["user"],
        api_key=key,
        cost=cost,
        prompt_tokens=0,
        completion_tokens=tokens,
        created_at=created_at or MID_MONTH,
    )


def parent_still_refused_past_its_budget(tree) -> None:
    """40 of the parent's 50 tokens are spent: after the reconcile, a request that could need 20 is refused and one
    of 10 admitted."""
    budget_counters_reconcile()
    with pytest.raises(QuotaExceededError):
        admit(tree, tree["parent"], "past-the-budget", 20)
    admit(tree, tree["parent"], "within-it", 10)


def delete_on_its_page(admin_client, key: ApiKey) -> None:
    assert admin_client.post(reverse("admin:billing_apikey_delete", args=[key.pk]), {"post": "yes"}).status_code == 302


def delete_selected(admin_client, keys: list[ApiKey]) -> None:
    form = {"action": "delete_selected", "_selected_action": [key.pk for key in keys], "post": "yes"}
    assert admin_client.post(reverse("admin:billing_apikey_changelist"), form).status_code == 302


def delete_in_the_shell(admin_client, key: ApiKey) -> None:
    key.delete()


def delete_a_queryset_in_the_shell(admin_client, key: ApiKey) -> None:
    ApiKey.objects.filter(pk=key.pk).delete()


@pytest.mark.parametrize(
    "delete",
    [
        delete_on_its_page,
        lambda admin_client, key: delete_selected(admin_client, [key]),
        delete_in_the_shell,
        delete_a_queryset_in_the_shell,
    ],
    ids=["admin-page", "admin-action", "shell", "shell-queryset"],
)
def test_a_deleted_childs_spend_still_counts_against_its_parents_budget(store, tree, admin_client, delete):
    """The child spends 30 tokens and its own child 10 (40 of the parent's 50), then the child is deleted (and the
    grandchild with it): both rows are the parent's now, and after the reconcile the parent is still refused a
    request past its budget. Before, the rows lost their key, the parent's spend read 0 from the ledger and the
    reconcile put its counter there: it could spend its whole budget again."""
    spend(tree, tree["child"], "by-the-child", 30)
    spend(tree, tree["grandchild"], "by-the-grandchild", 10)

    delete(admin_client, tree["child"])

    assert not ApiKey.objects.filter(pk__in=[tree["child"].pk, tree["grandchild"].pk]).exists()
    rows = UsageRecord.objects.filter(request_id__in=["by-the-child", "by-the-grandchild"])
    assert set(rows.values_list("api_key_id", flat=True)) == {tree["parent"].pk}
    parent_still_refused_past_its_budget(tree)


def test_keys_deleted_under_different_parents_at_once_go_each_to_their_own(store, tree, admin_client):
    """The admin's action on keys of two trees: each deleted key's rows go to its own parent, in one statement."""
    other = api_key_create(user=tree["user"], name="other", budget_usd=BUDGET).api_key
    others_child = api_key_create(user=tree["user"], name="others-child", budget_usd=BUDGET, parent=other).api_key
    spend(tree, tree["grandchild"], "by-the-grandchild", 40)
    spend(tree, others_child, "by-the-others-child", 5)

    delete_selected(admin_client, [tree["grandchild"], others_child])

    assert UsageRecord.objects.get(request_id="by-the-grandchild").api_key_id == tree["child"].pk
    assert UsageRecord.objects.get(request_id="by-the-others-child").api_key_id == other.pk
    parent_still_refused_past_its_budget(tree)


@pytest.mark.parametrize(
    "delete",
    [
        lambda admin_client, tree: delete_on_its_page(admin_client, tree["parent"]),
        lambda admin_client, tree: delete_selected(admin_client, [tree["parent"], tree["grandchild"]]),
        lambda admin_client, tree: tree["parent"].delete(),
        lambda admin_client, tree: tree["user"].delete(),
    ],
    ids=["admin-page", "admin-action", "shell", "owner-deleted"],
)
def test_a_whole_tree_deleted_leaves_its_rows_without_a_key_as_before(store, tree, admin_client, delete):
    """No key stays above them: the rows keep no key, as before, and the user's own figures keep them."""
    rows = [
        spend(tree, tree["child"], "by-the-child", 30),
        spend(tree, tree["grandchild"], "by-the-grandchild", 10),
        spend(tree, tree["parent"], "by-the-parent", 5),
    ]

    delete(admin_client, tree)

    assert not ApiKey.objects.exists()
    assert list(UsageRecord.objects.values_list("api_key_id", flat=True).distinct()) == [None]
    if UsageRecord.objects.filter(user__isnull=False).exists():
        assert UsageRecord.objects.filter(user=tree["user"]).aggregate(c=Sum("cost"))["c"] == sum(
            row.cost for row in rows
        )


def by_key(model, **where) -> dict[int | None, Decimal]:
    return {
        row["api_key_id"]: row["total"]
        for row in model.objects.filter(**where).values("api_key_id").annotate(total=Sum("cost")).order_by()
    }


def test_the_rollups_by_key_follow_the_ledger_and_a_rebuild_changes_nothing(tree, admin_client):
    """Yesterday and today rolled up, and a sealed day (retention deleted its raw rows) whose rollup holds the
    child's spend alone: after the child's delete its rollup rows are the parent's, the rollup by key is the
    ledger's by key on the days it can be rebuilt, and rebuilding them (twice) gives the same figures."""
    today = MID_MONTH.date()
    yesterday = today - timedelta(days=1)
    sealed = date(2026, 9, 1)
    spend(tree, tree["parent"], "parent-today", 5)
    spend(tree, tree["child"], "child-today", 7)
    spend(tree, tree["grandchild"], "grandchild-yesterday", 3, created_at=MID_MONTH - timedelta(days=1))
    spend(tree, tree["child"], "child-yesterday", 11, created_at=MID_MONTH - timedelta(days=1))
    for day in (yesterday, today):
        daily_usage_rebuild(day=day)
    DailyUsage.objects.create(
        day=sealed, user=tree["user"], api_key=tree["child"], model_name="gpt-test", requests=2, cost=Decimal("0.9")
    )
    DailyUsageSeal.objects.create(day=sealed, through_id=0)

    delete_on_its_page(admin_client, tree["child"])

    parent = tree["parent"].pk
    assert by_key(DailyUsage, day=sealed) == {parent: Decimal("0.9")}
    for day in (yesterday, today):
        ledger = by_key(UsageRecord, created_at__date=day)
        assert set(ledger) == {parent}
        assert by_key(DailyUsage, day=day) == ledger
        for _ in range(2):
            daily_usage_rebuild(day=day)
            assert by_key(DailyUsage, day=day) == ledger
    daily_usage_rebuild(day=sealed)
    assert by_key(DailyUsage, day=sealed) == {parent: Decimal("0.9")}
    assert by_key(DailyUsage)[parent] == Decimal("0.9") + 26 * FLAT_TOKEN
