"""What `make run` loads before it serves: the demo admin, a demo user on the Free plan, the demo
catalog and any real provider whose key is in the environment.

The catalog goes through ``providers_load`` (the service behind ``loadproviders``), so the demo file
is validated exactly like an operator's file. Running it again changes nothing that is already
right: rows are matched by name, and each demo login's password is generated once and kept in
``.local/demo-admin-password`` and ``.local/demo-user-password``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from providers.exceptions import ApplicationError
from providers.models import ProviderKind
from providers.services.catalog_file import providers_load

DEMO_CATALOG = Path(settings.BASE_DIR) / "llmhub" / "demo" / "providers.yaml"
ADMIN_USERNAME = "admin"
# A plain user on the Free plan: what the chat page looks like to someone who is not an admin.
DEMO_USERNAME = "demo"
DEMO_PLAN = "Free"


def _model(name: str, inp: str, out: str, cached: str | None, context: int, max_out: int | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "upstream": name, "input_per_mtok": inp, "output_per_mtok": out}
    entry.update(context_window=context, cached_input_per_mtok=cached, max_output_tokens=max_out)
    return entry


# Real providers added when the variable is set, in the loadproviders format. Prices are the
# providers' list prices in USD per million tokens (input, output, cached input).
ENV_PROVIDERS: dict[str, dict[str, Any]] = {
    "OPENAI_API_KEY": {
        "name": "openai",
        "kind": ProviderKind.OPENAI.value,
        "api_key": "${OPENAI_API_KEY}",
        "models": [
            _model("gpt-4o-mini", "0.15", "0.60", "0.075", 128_000, 16_384),
            _model("gpt-4o", "2.50", "10.00", "1.25", 128_000, 16_384),
        ],
    },
    "ANTHROPIC_API_KEY": {
        "name": "anthropic",
        "kind": ProviderKind.ANTHROPIC.value,
        "api_key": "${ANTHROPIC_API_KEY}",
        "models": [
            _model("claude-haiku-4-5", "1.00", "5.00", "0.10", 200_000, 64_000),
            _model("claude-sonnet-4-5", "3.00", "15.00", "0.30", 200_000, 64_000),
        ],
    },
    # Local models cost nothing per token. Ollama does not check the key, but the SDK wants one.
    "OLLAMA_BASE_URL": {
        "name": "ollama",
        "kind": ProviderKind.OLLAMA.value,
        "api_key": "ollama",
        "models": [
            _model("llama3.2", "0", "0", None, 128_000, None),
            _model("qwen2.5", "0", "0", None, 32_768, None),
        ],
    },
}


class Command(BaseCommand):
    help = "Create the demo admin and the demo catalog (and real providers whose keys are in the environment)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--catalog", type=Path, default=DEMO_CATALOG, help="YAML catalog of demo providers.")
        parser.add_argument(
            "--upstream-url",
            help="Point the demo providers at a fake upstream on another address, e.g. http://127.0.0.1:18081.",
        )

    def handle(self, *args: Any, catalog: Path, upstream_url: str | None, **options: Any) -> None:
        try:
            data = yaml.safe_load(catalog.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise CommandError(f"cannot read the demo catalog {catalog}: {exc}") from None
        if upstream_url:
            for spec in data.get("providers") or []:
                spec["base_url"] = _rehost(spec.get("base_url", ""), upstream_url)
        for variable, spec in ENV_PROVIDERS.items():
            value = os.environ.get(variable, "").strip()
            if value:
                spec = dict(spec)
                if variable == "OLLAMA_BASE_URL":
                    # Ollama speaks the OpenAI protocol under /v1; people usually give the server's root.
                    root = value.rstrip("/")
                    spec["base_url"] = root if root.endswith("/v1") else root + "/v1"
                data["providers"].append(spec)
        try:
            result = providers_load(data=data, env=os.environ)
        except ApplicationError as exc:
            raise CommandError(f"the demo catalog was not loaded: {exc.message}") from None
        for row in result.rows:
            self.stdout.write(str(row))

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


def _rehost(base_url: str, upstream_url: str) -> str:
    target = urlsplit(upstream_url)
    return urlsplit(base_url)._replace(scheme=target.scheme, netloc=target.netloc).geturl()
