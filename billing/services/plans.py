"""Plans: putting a user on one, and the lazy default for a user who has none yet."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from audit.services import AuditEntry, audit_records
from core.cache import forget_now_and_after_commit
from core.id_batches import id_batches

from ..exceptions import BillingMisconfiguredError
from ..models import Plan, UserPlan
from ..selectors import limits_cache


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


# A user's own limits, which their plan's stand in for when empty.
OWN_LIMITS = ("daily_token_quota", "monthly_budget_usd", "rpm", "tpm")


@transaction.atomic
def user_plans_overrides_clear(*, user_plan_ids: Iterable[int]) -> int:
    """Empty the own limits of these users' plans (their plan's apply), each recorded as its save would be
    (``billing.userplan.change``, the limits it had); a few queries for each ``IDS_A_STATEMENT`` of them, not a
    few a user (an admin's selection across the list). Returns how many had limits of their own."""
    cleared: list[AuditEntry] = []
    user_ids: list[int] = []
    own = Q()
    for name in OWN_LIMITS:
        own |= Q(**{f"{name}__isnull": False})
    for batch in id_batches(sorted(set(user_plan_ids))):
        rows = list(
            UserPlan.objects.select_for_update(of=("self",))
            .filter(own, pk__in=batch)
            .select_related("user", "plan")
            .order_by("pk")
        )
        UserPlan.objects.filter(pk__in=[row.pk for row in rows]).update(
            **dict.fromkeys(OWN_LIMITS), updated_at=timezone.now()
        )
        for row in rows:
            changes = {name: [getattr(row, name), None] for name in OWN_LIMITS if getattr(row, name) is not None}
            cleared.append(AuditEntry(f"{UserPlan._meta.label_lower}.change", target=row, changes=changes))
            user_ids.append(row.user_id)
    audit_records(cleared)

    def forget() -> None:
        for user_id in user_ids:
            limits_cache.invalidate(("user", user_id))

    forget_now_and_after_commit(forget)
    return len(cleared)


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
