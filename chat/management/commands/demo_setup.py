"""What `make run` loads before it serves: the demo admin, a demo user on the Free plan, the demo
catalog and any real provider whose key is in the environment.

The demo catalog points at the bundled fake upstream, two hosts of it in one process (``east`` and
``west``, see ``scripts/run_dev.py``): ``demo-gpt-4o-mini`` is served by a deployment on each, weighted 3:1,
and falls back to ``demo-claude-haiku``, so the chat page and curl show balancing, fail-over and fallback
without a network. The rows are written with the ORM, checked with ``full_clean()`` like an admin's input.
Running it again changes nothing that is already right: rows are matched by name (and each deployment by
its model and name), and each demo login's password is generated once and kept in
``.local/demo-admin-password`` and ``.local/demo-user-password``.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import models, transaction

from providers.models import CatalogModel, Deployment, ModelMode, Provider, ProviderKind

ADMIN_USERNAME = "admin"
# A plain user on the Free plan: what the chat page looks like to someone who is not an admin.
DEMO_USERNAME = "demo"
DEMO_PLAN = "Free"
EAST_URL = "http://127.0.0.1:18080"
WEST_URL = "http://127.0.0.1:18082"
# The fake upstream accepts any key; the SDKs only insist that there is one.
_FAKE_KEY = "demo-fake-upstream-accepts-any-key"


@dataclass(frozen=True)
class DemoProvider:
    name: str
    kind: str
    host: str  # "east" or "west" (the fake upstream's listeners), or "env" for a real provider
    path: str = ""
    api_key: str = _FAKE_KEY


@dataclass(frozen=True)
class DemoDeployment:
    name: str
    provider: str
    upstream_id: str
    prices: tuple[str, str, str | None]  # input, output, cached input, USD per million tokens
    weight: int = 1


@dataclass(frozen=True)
class DemoModel:
    name: str
    deployments: tuple[DemoDeployment, ...]
    context_window: int = 128_000
    max_output_tokens: int | None = None
    mode: str = ModelMode.CHAT
    fallbacks: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def _one(name: str, provider: str, upstream: str, prices: tuple[str, str, str | None], **kw: Any) -> DemoModel:
    """A model with one deployment (named after its provider)."""
    return DemoModel(name, (DemoDeployment(provider, provider, upstream, prices),), **kw)


# Nothing here costs money, the prices only make the ledger and the dashboards show something. With the Free
# plan's limit of $1 per million output tokens, a Free user (`demo`) may use demo-gpt-4o-mini only.
DEMO_PROVIDERS = (
    DemoProvider("demo-fake-openai", ProviderKind.OPENAI_COMPATIBLE, "east", "/v1"),
    DemoProvider("demo-fake-openai-west", ProviderKind.OPENAI_COMPATIBLE, "west", "/v1"),
    DemoProvider("demo-fake-anthropic", ProviderKind.ANTHROPIC, "east"),
)
_MINI_PRICES = ("0.15", "0.60", "0.075")
DEMO_MODELS = (
    # Balanced 3:1 over the two hosts; when both fail, answered by demo-claude-haiku.
    DemoModel(
        "demo-gpt-4o-mini",
        (
            DemoDeployment("east", "demo-fake-openai", "fake-gpt-4o-mini", _MINI_PRICES, weight=3),
            DemoDeployment("west", "demo-fake-openai-west", "fake-gpt-4o-mini", _MINI_PRICES, weight=1),
        ),
        context_window=128_000,
        max_output_tokens=16_384,
        fallbacks=("demo-claude-haiku",),
    ),
    _one(
        "demo-gpt-4o",
        "demo-fake-openai",
        "fake-gpt-4o",
        ("2.50", "10.00", "1.25"),
        context_window=128_000,
        max_output_tokens=16_384,
        extra={"supports_vision": True},
    ),
    # Answers /v1/embeddings only (never offered in the chat picker); priced per input token.
    _one(
        "demo-embedding-small",
        "demo-fake-openai",
        "fake-embedding-small",
        ("0.02", "0", None),
        context_window=8192,
        mode=ModelMode.EMBEDDING,
    ),
    _one(
        "demo-claude-haiku",
        "demo-fake-anthropic",
        "fake-claude-haiku",
        ("0.80", "4.00", "0.08"),
        context_window=200_000,
        max_output_tokens=8192,
    ),
)

# Real providers added when the variable is set. Prices are the providers' list prices in USD per million
# tokens (input, output, cached input). Local models cost nothing per token.
ENV_CATALOG: dict[str, tuple[DemoProvider, tuple[DemoModel, ...]]] = {
    "OPENAI_API_KEY": (
        DemoProvider("openai", ProviderKind.OPENAI, "env"),
        (
            _one(
                "gpt-4o-mini", "openai", "gpt-4o-mini", _MINI_PRICES, context_window=128_000, max_output_tokens=16_384
            ),
            _one(
                "gpt-4o",
                "openai",
                "gpt-4o",
                ("2.50", "10.00", "1.25"),
                context_window=128_000,
                max_output_tokens=16_384,
            ),
        ),
    ),
    "ANTHROPIC_API_KEY": (
        DemoProvider("anthropic", ProviderKind.ANTHROPIC, "env"),
        (
            _one(
                "claude-haiku-4-5",
                "anthropic",
                "claude-haiku-4-5",
                ("1.00", "5.00", "0.10"),
                context_window=200_000,
                max_output_tokens=64_000,
            ),
            _one(
                "claude-sonnet-4-5",
                "anthropic",
                "claude-sonnet-4-5",
                ("3.00", "15.00", "0.30"),
                context_window=200_000,
                max_output_tokens=64_000,
            ),
        ),
    ),
    # Ollama does not check the key, but the SDK wants one.
    "OLLAMA_BASE_URL": (
        DemoProvider("ollama", ProviderKind.OLLAMA, "env", api_key="ollama"),
        (
            _one("llama3.2", "ollama", "llama3.2", ("0", "0", None), context_window=128_000),
            _one("qwen2.5", "ollama", "qwen2.5", ("0", "0", None), context_window=32_768),
        ),
    ),
}


class Command(BaseCommand):
    help = "Create the demo admin and the demo catalog (and real providers whose keys are in the environment)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--upstream-url",
            default=EAST_URL,
            help="Where the fake upstream's east host listens (default: %(default)s).",
        )
        parser.add_argument(
            "--west-upstream-url",
            default=WEST_URL,
            help="Where the fake upstream's west host listens (default: %(default)s).",
        )

    def handle(self, *args: Any, upstream_url: str, west_upstream_url: str, **options: Any) -> None:
        hosts = {"east": upstream_url, "west": west_upstream_url}
        providers = [(spec, _rehost(spec, hosts[spec.host])) for spec in DEMO_PROVIDERS]
        catalog = list(DEMO_MODELS)
        for variable, (spec, entries) in ENV_CATALOG.items():
            value = os.environ.get(variable, "").strip()
            if not value:
                continue
            if variable == "OLLAMA_BASE_URL":
                # Ollama speaks the OpenAI protocol under /v1; people usually give the server's root.
                root = value.rstrip("/")
                providers.append((spec, root if root.endswith("/v1") else root + "/v1"))
            else:
                providers.append((DemoProvider(spec.name, spec.kind, spec.host, api_key=value), ""))
            catalog += entries
        try:
            for line in catalog_ensure(providers=providers, catalog=catalog):
                self.stdout.write(line)
        except ValidationError as exc:
            raise CommandError(f"the demo catalog was not loaded: {'; '.join(exc.messages)}") from None

        local = Path(settings.LOCAL_DIR)
        password, note = login_ensure(
            username=ADMIN_USERNAME, password_file=local / "demo-admin-password", superuser=True
        )
        self._admin_plan()
        if password is None:
            self.stdout.write(self.style.WARNING(f"Demo admin {ADMIN_USERNAME!r}: {note}"))
        else:
            self.stdout.write(self.style.SUCCESS(f"Demo admin: user {ADMIN_USERNAME!r}, password {password!r} {note}"))

        password, note = login_ensure(username=DEMO_USERNAME, password_file=local / "demo-user-password")
        plan = self._demo_user_plan()
        if password is None:
            self.stdout.write(self.style.WARNING(f"Demo user {DEMO_USERNAME!r}: {note}"))
        else:
            self.stdout.write(
                self.style.SUCCESS(f"Demo user: user {DEMO_USERNAME!r} ({plan}), password {password!r} {note}")
            )

    def _admin_plan(self) -> None:
        """The demo admin tries every demo model, so it is on the unlimited plan rather than the default."""
        from billing.models import Plan
        from billing.services.plans import plan_assign

        plan = Plan.objects.filter(name="Enterprise").first()
        if plan is not None:
            plan_assign(user=get_user_model().objects.get(username=ADMIN_USERNAME), plan=plan)
            self.stdout.write(f"Demo admin plan: {plan.name}")

    def _demo_user_plan(self) -> str:
        """Put the demo user on the Free plan once; a plan an admin gives it later is left alone.

        Returns a note naming the plan the user is on, for the line that introduces the login.
        """
        from billing.models import Plan, UserPlan
        from billing.services.plans import plan_assign

        user = get_user_model().objects.get(username=DEMO_USERNAME)
        current = UserPlan.objects.filter(user=user).select_related("plan").first()
        if current is not None:
            return f"{current.plan.name} plan"
        plan = Plan.objects.filter(name=DEMO_PLAN).first()
        if plan is None:
            return f"no {DEMO_PLAN} plan in the database: the default plan applies"
        plan_assign(user=user, plan=plan)
        return f"{plan.name} plan"


def login_ensure(*, username: str, password_file: Path, superuser: bool = False) -> tuple[str | None, str]:
    """Make sure the demo login exists; return its password (None when unknown) and a note.

    The file is the password's home: it is generated once, and a user that exists without the file
    (say .local/ was removed) gets a new one. A password changed in the admin since is left alone.
    """
    user_model = get_user_model()
    stored = password_file.read_text().strip() if password_file.exists() else ""
    user = user_model.objects.filter(username=username).first()
    if user is not None and stored:
        if user.check_password(stored):
            return stored, f"(kept in {password_file})"
        return None, (
            f"its password is no longer the one in {password_file}; `manage.py changepassword {username}` sets one."
        )
    password = stored or secrets.token_urlsafe(12)
    if user is None:
        create = user_model.objects.create_superuser if superuser else user_model.objects.create_user
        create(username, email=f"{username}@localhost", password=password)
    else:
        user.set_password(password)
        user.save(update_fields=["password"])
    if not stored:
        password_file.parent.mkdir(parents=True, exist_ok=True)
        # Created with mode 600 from the start: there is no moment at which others could read it.
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(password + "\n")
    return password, f"(kept in {password_file})"


def _rehost(spec: DemoProvider, upstream_url: str) -> str:
    target = urlsplit(upstream_url)
    return f"{target.scheme}://{target.netloc}{spec.path}"


def _same(instance: models.Model, name: str, value: Any) -> bool:
    if isinstance(value, models.Model):
        return getattr(instance, f"{name}_id") == value.pk
    current = getattr(instance, name)
    return (current.reveal() if hasattr(current, "reveal") else current) == value


def _row_ensure(model: type[models.Model], lookup: dict[str, Any], values: dict[str, Any]) -> tuple[Any, str]:
    """The row matching ``lookup`` with ``values``: created, updated (only the fields that differ) or
    unchanged; checked with ``full_clean()`` before it is written."""
    row = model.objects.filter(**lookup).first()
    if row is None:
        row, action = model(**lookup, **values), "created"
    else:
        changed = {name: value for name, value in values.items() if not _same(row, name, value)}
        if not changed:
            return row, "unchanged"
        for name, value in changed.items():
            setattr(row, name, value)
        action = "updated"
    row.full_clean()
    row.save()
    return row, action


@transaction.atomic
def catalog_ensure(*, providers: list[tuple[DemoProvider, str]], catalog: list[DemoModel]) -> list[str]:
    """Write the providers (each with its base URL) and the models with their deployments; one line a row."""
    lines = []
    rows: dict[str, Provider] = {}
    for spec, base_url in providers:
        values = {"kind": spec.kind, "base_url": base_url, "api_key": spec.api_key, "enabled": True}
        rows[spec.name], action = _row_ensure(Provider, {"name": spec.name}, values)
        lines.append(f"provider {spec.name}: {action}")
    for entry in catalog:
        values = {
            "mode": entry.mode,
            "context_window": entry.context_window,
            "max_output_tokens": entry.max_output_tokens,
            "fallbacks": list(entry.fallbacks),
            "enabled": True,
            **entry.extra,
        }
        model, action = _row_ensure(CatalogModel, {"name": entry.name}, values)
        lines.append(f"model {entry.name}: {action}")
        for deployment in entry.deployments:
            inp, out, cached = deployment.prices
            values = {
                "provider": rows[deployment.provider],
                "upstream_id": deployment.upstream_id,
                "input_per_mtok": Decimal(inp),
                "output_per_mtok": Decimal(out),
                "cached_input_per_mtok": Decimal(cached) if cached is not None else None,
                "weight": deployment.weight,
                "enabled": True,
            }
            _, action = _row_ensure(Deployment, {"model": model, "name": deployment.name}, values)
            lines.append(f"deployment {entry.name}/{deployment.name}: {action}")
    return lines
