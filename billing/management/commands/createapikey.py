"""``manage.py createapikey USERNAME``: create a gateway key and print its secret as the last line.

The secret is the last line, alone, so that a script can take it with ``| tail -n 1``.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from billing.models import BudgetPeriod, KeyScope
from billing.services.budgets import usd
from billing.services.keys import CreatedKey, api_key_create


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


class Command(BaseCommand):
    help = "Create a gateway API key for a user and print its secret (shown this once) as the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", help="The user who owns the key.")
        key = parser.add_argument_group("key")
        key.add_argument("--name", default="default", help="A label to tell the user's keys apart.")
        key.add_argument(
            "--expires-days", type=_positive_int, metavar="N", help="The key expires N days from now (default: never)."
        )
        key.add_argument(
            "--manage-keys",
            action="store_true",
            help="Let the key manage keys over /api/keys/: create keys under it (never with more than it has) "
            "and list or revoke them (default: it may not). The same as --scope keys:manage.",
        )
        key.add_argument(
            "--scope",
            action="append",
            default=[],
            choices=KeyScope.values,
            metavar="NAME",
            dest="scopes",
            help="A right beyond calling models; repeat for several (default: none). "
            + "; ".join(f"{scope.value}: {scope.label}" for scope in KeyScope)
            + ".",
        )
        limits = parser.add_argument_group("limits of the key (on top of its owner's plan)")
        limits.add_argument("--budget", type=_usd, metavar="USD", help="Spend cap of the key (default: none).")
        limits.add_argument(
            "--period", choices=BudgetPeriod.values, default=BudgetPeriod.MONTHLY, help="When the budget resets."
        )
        limits.add_argument("--rpm", type=_positive_int, metavar="N", help="Requests per minute (default: none).")
        limits.add_argument("--tpm", type=_positive_int, metavar="N", help="Tokens per minute (default: none).")

    def handle(self, *args: Any, **options: Any) -> None:
        user = self._user(options["username"])
        # Everything this command sets up for the key is created together, or not at all.
        with transaction.atomic():
            created = self._create_key(user, options)
        for line in self._describe(created):
            self.stdout.write(line)
        self.stdout.write(created.secret)

    def _user(self, username: str) -> Any:
        user_model = get_user_model()
        try:
            return user_model._default_manager.get_by_natural_key(username)
        except user_model.DoesNotExist:
            raise CommandError(f"No user named {username!r}.") from None

    def _create_key(self, user: Any, options: dict[str, Any]) -> CreatedKey:
        days = options["expires_days"]
        expires_at = timezone.now() + timedelta(days=days) if days else None
        scopes = [*options["scopes"], *([KeyScope.KEYS_MANAGE] if options["manage_keys"] else [])]
        return api_key_create(
            user=user,
            name=options["name"],
            expires_at=expires_at,
            scopes=scopes,
            budget_usd=options["budget"],
            budget_period=options["period"],
            rpm=options["rpm"],
            tpm=options["tpm"],
        )

    def _describe(self, created: CreatedKey) -> list[str]:
        api_key = created.api_key
        expiry = api_key.expires_at.isoformat(timespec="seconds") if api_key.expires_at else "never"
        owner = api_key.user.get_username()
        scopes = f" Scopes: {', '.join(api_key.scopes)}." if api_key.scopes else ""
        return [
            f"Created API key {api_key.prefix}… ({api_key.name!r}) for {owner}; expires: {expiry}.{scopes}",
            *_limits_line(api_key),
            "The secret below is shown this once; llmhub keeps only its hash.",
        ]


def _usd(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{value!r} is not an amount of dollars") from None
    if not amount.is_finite() or amount < 0 or amount.as_tuple().exponent < -4:
        raise argparse.ArgumentTypeError("give dollars, at least 0, with at most 4 decimals")
    return amount


def _limits_line(api_key: Any) -> list[str]:
    limits = []
    if api_key.budget_usd is not None:
        limits.append(f"budget {usd(api_key.budget_usd)} {api_key.budget_period}")
    limits += [f"{api_key.rpm} requests/min"] if api_key.rpm else []
    limits += [f"{api_key.tpm} tokens/min"] if api_key.tpm else []
    return [f"Limits: {', '.join(limits)}."] if limits else []
