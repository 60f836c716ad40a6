"""The limits' in-process cache (``billing.selectors.limits_cache``) against a change being committed: a request
that reads a user's or a key's limits between the change and its commit (another connection: the limits are still
the old ones for it) must not keep that copy, or the requests after the change answered would be admitted under the
old limits for the cache's TTL."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync

from billing.models import Plan, UserPlan
from billing.selectors import key_limits, user_limits
from billing.services.keys import api_key_change, api_key_create
from billing.services.plans import plan_assign, user_plans_overrides_clear
from tests.factories import UserFactory
from tests.transactions import read_before_commit

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def free_user(plans):
    user = UserFactory(username="freebie")
    plan_assign(user=user, plan=plans["Free"])
    return user


def _user_rpm(user_id: int) -> tuple[str | None, int | None]:
    limits = async_to_sync(user_limits)(user_id)
    return limits.plan_name, limits.rpm


def test_a_plan_assigned_while_a_request_reads_the_users_limits_applies_once_committed(free_user, plans):
    assert _user_rpm(free_user.pk) == ("Free", 20)
    meanwhile = read_before_commit(
        lambda: plan_assign(user=free_user, plan=plans["Pro"]), lambda: _user_rpm(free_user.pk)
    )
    assert meanwhile == ("Free", 20)  # the change was not committed yet
    assert _user_rpm(free_user.pk) == ("Pro", 600)


def test_a_plans_change_while_a_request_reads_its_limits_applies_once_committed(free_user, plans):
    assert _user_rpm(free_user.pk) == ("Free", 20)

    def raise_the_rate() -> None:
        plan = Plan.objects.get(name="Free")
        plan.rpm = 40
        plan.save()

    assert read_before_commit(raise_the_rate, lambda: _user_rpm(free_user.pk)) == ("Free", 20)
    assert _user_rpm(free_user.pk) == ("Free", 40)


def test_a_users_own_limits_cleared_while_a_request_reads_them_apply_once_committed(free_user):
    UserPlan.objects.filter(user=free_user).update(rpm=1)
    assert _user_rpm(free_user.pk) == ("Free", 1)
    user_plan = UserPlan.objects.get(user=free_user)
    meanwhile = read_before_commit(
        lambda: user_plans_overrides_clear(user_plan_ids=[user_plan.pk]), lambda: _user_rpm(free_user.pk)
    )
    assert meanwhile == ("Free", 1)
    assert _user_rpm(free_user.pk) == ("Free", 20)  # the plan's


def test_a_keys_rate_changed_while_a_request_reads_it_applies_once_committed(free_user):
    key = api_key_create(user=free_user, rpm=5).api_key
    assert async_to_sync(key_limits)(key.pk).rpm == 5

    def raise_the_rate() -> None:
        key.rpm = 50
        api_key_change(api_key=key)

    assert read_before_commit(raise_the_rate, lambda: async_to_sync(key_limits)(key.pk).rpm) == 5
    assert async_to_sync(key_limits)(key.pk).rpm == 50
