"""``manage.py setplan USERNAME PLAN``: put a user on a plan (Free, Pro, Enterprise, or any plan in the admin)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.services.plans import plan_assign, plan_get


class Command(BaseCommand):
    help = "Put a user on a plan. The user's own overrides (quota, budget, rates) stay unless --clear-overrides."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("plan", help="A plan's name, any case.")
        parser.add_argument("--clear-overrides", action="store_true", help="Drop the user's own limits too.")

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        try:
            user = user_model._default_manager.get_by_natural_key(options["username"])
        except user_model.DoesNotExist:
            raise CommandError(f"No user named {options['username']!r}.") from None
        try:
            plan = plan_get(name=options["plan"])
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        user_plan = plan_assign(user=user, plan=plan, clear_overrides=options["clear_overrides"])
        overrides = [
            f"{label} {value}"
            for label, value in (
                ("daily tokens", user_plan.daily_token_quota),
                ("monthly budget $", user_plan.monthly_budget_usd),
                ("rpm", user_plan.rpm),
                ("tpm", user_plan.tpm),
            )
            if value is not None
        ]
        suffix = f" (own limits: {', '.join(overrides)})" if overrides else ""
        self.stdout.write(f"{user.get_username()} is now on the {plan.name} plan{suffix}.")
