"""Plans: putting a user on one, and the lazy default for a user who has none yet."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from ..exceptions import BillingMisconfiguredError
from ..models import Plan, UserPlan


def plan_get(*, name: str) -> Plan:
    plan = Plan.objects.filter(name__iexact=name.strip()).first()
    if plan is None:
        known = ", ".join(Plan.objects.order_by("name").values_list("name", flat=True)) or "none"
        raise ValidationError({"plan": f"There is no plan named {name!r} (plans: {known})."})
    return plan


@transaction.atomic
def plan_assign(*, user: Any, plan: Plan, clear_overrides: bool = False) -> UserPlan:
    """Put ``user`` on ``plan``; their own overrides stay unless ``clear_overrides``."""
    user_plan, created = UserPlan.objects.select_for_update().get_or_create(user=user, defaults={"plan": plan})
    if not created:
        user_plan.plan = plan
    if clear_overrides:
        user_plan.daily_token_quota = user_plan.monthly_budget_usd = user_plan.rpm = user_plan.tpm = None
    user_plan.save()  # the post_save signal clears the cached limits
    return user_plan


def user_plan_ensure(*, user_id: int) -> UserPlan | None:
    """The user's plan, creating it on the default plan at their first request; None when the
    deployment has no default plan (``LLMHUB_DEFAULT_PLAN`` empty) and so leaves such users unrestricted."""
    name = settings.LLMHUB_DEFAULT_PLAN
    if not name:
        return None
    plan = Plan.objects.filter(name=name).first()
    if plan is None:
        # Failing closed: letting everyone through unlimited because a plan row went missing would be worse.
        raise BillingMisconfiguredError(
            f"The default plan {name!r} (LLMHUB_DEFAULT_PLAN) does not exist; an administrator must create it."
        )
    try:
        with transaction.atomic():
            user_plan, _ = UserPlan.objects.select_related("plan").get_or_create(
                user_id=user_id, defaults={"plan": plan}
            )
    except IntegrityError:
        # Another process created it first.
        user_plan = UserPlan.objects.select_related("plan").get(user_id=user_id)
    return user_plan
