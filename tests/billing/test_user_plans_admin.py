"""The users' plans' "Clear the selected users' own limits" at scale: a few queries a batch of users, not a few a
user, still one audit event a user whose limits changed, as a save records it (docs/ledger.md, "The admin at
scale")."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.models import AuditEvent
from audit.services import audit_verify
from billing.models import Plan, UserPlan

pytestmark = pytest.mark.django_db

User = get_user_model()


def plans_with_own_limits(count: int, *, start: int, plan: Plan) -> list[UserPlan]:
    users = User.objects.bulk_create(User(username=f"u{start + n}") for n in range(count))
    return UserPlan.objects.bulk_create(
        UserPlan(user=user, plan=plan, rpm=5, monthly_budget_usd=Decimal("2.50")) for user in users
    )


def clear(admin_client, user_plans: list[UserPlan]) -> CaptureQueriesContext:
    form = {"action": "clear_overrides", "_selected_action": [user_plan.pk for user_plan in user_plans]}
    with CaptureQueriesContext(connection) as queries:
        assert admin_client.post(reverse("admin:billing_userplan_changelist"), form).status_code == 302
    return queries


def test_clearing_the_own_limits_costs_a_few_queries_a_batch_of_users(admin_client):
    plan = Plan.objects.create(name="team")
    first = plans_with_own_limits(1, start=0, plan=plan)
    few, many = plans_with_own_limits(10, start=100, plan=plan), plans_with_own_limits(200, start=1_000, plan=plan)
    clear(admin_client, first)  # the first fills Django's caches: not counted
    on_few, on_many = clear(admin_client, few), clear(admin_client, many)

    # More only by the events' inserts, a statement a batch: fewer than a query for every ten users more (it was
    # about eight a user).
    assert len(on_few) <= len(on_many) < len(on_few) + (len(many) - len(few)) // 10
    assert not UserPlan.objects.exclude(rpm=None, monthly_budget_usd=None).exists()
    events = AuditEvent.objects.filter(action="billing.userplan.change")
    assert sorted(int(pk) for pk in events.values_list("target_id", flat=True)) == sorted(
        user_plan.pk for user_plan in [*first, *few, *many]
    )
    # As a save records it: what each limit was, named by the user and their plan.
    recorded = events.get(target_id=str(many[0].pk))
    assert (recorded.target_repr, recorded.changes) == (
        "u1000 on team",
        {"monthly_budget_usd": ["2.5000", None], "rpm": [5, None]},
    )
    assert audit_verify() is None
