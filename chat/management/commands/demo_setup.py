"""What `make run` loads before it serves: the demo admin, a demo user on the Free plan, the demo
catalog and any real provider whose key is in the environment, and the demo's brand, prompt templates and
running A/B experiment with its seeded history (``experiments.demo``; ``--reset-demo-experiment`` seeds
it afresh).

The catalog has one home, the files in ``llmhub/demo/``, loaded through the catalog-file loader
(``providers_load``, what ``manage.py loadproviders`` runs): ``providers.yaml`` is the demo catalog, which
points at the bundled fake upstream, two hosts of it in one process (``east`` and ``west``, see
``scripts/run_dev.py``) whose URLs it reads from ``${LLMHUB_DEMO_EAST_URL}`` and ``${LLMHUB_DEMO_WEST_URL}``;
``openai.yaml``, ``anthropic.yaml`` and ``ollama.yaml`` are added when their variable is set. All of them
are loaded in one call, so the catalog is written whole or not at all.
Running it again changes nothing that is already right (the loader saves only rows that differ), and each
demo login's password is generated once and kept in ``.local/demo-admin-password`` and
``.local/demo-user-password``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.urls import NoReverseMatch, reverse

from core.exceptions import ApplicationError
from providers.services.catalog_file import LoadResult, catalog_yaml_parse, providers_load

ADMIN_USERNAME = "admin"
# A plain user on the Free plan: what the chat page looks like to someone who is not an admin.
DEMO_USERNAME = "demo"
DEMO_PLAN = "Free"
EAST_URL = "http://127.0.0.1:18080"
WEST_URL = "http://127.0.0.1:18082"
CATALOG_DIR = Path(settings.BASE_DIR) / "llmhub" / "demo"
DEMO_CATALOG = CATALOG_DIR / "providers.yaml"
# A real provider's file, loaded when its variable is set (the files read the variable themselves).
ENV_CATALOGS = {
    "OPENAI_API_KEY": CATALOG_DIR / "openai.yaml",
    "ANTHROPIC_API_KEY": CATALOG_DIR / "anthropic.yaml",
    "OLLAMA_BASE_URL": CATALOG_DIR / "ollama.yaml",
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
        parser.add_argument(
            "--reset-demo-experiment",
            action="store_true",
            help="Delete the demo experiment and its seeded history, and seed them afresh.",
        )

    def handle(
        self, *args: Any, upstream_url: str, west_upstream_url: str, reset_demo_experiment: bool = False, **options: Any
    ) -> None:
        try:
            result = demo_catalog_load(east_url=upstream_url, west_url=west_upstream_url, environ=os.environ)
        except ApplicationError as exc:
            raise CommandError(f"the demo catalog was not loaded: {exc.message} Nothing was written.") from None
        for warning in result.warnings:
            self.stderr.write(self.style.WARNING(f"warning: {warning}"))
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
        self._experiment(reset=reset_demo_experiment)

    def _experiment(self, *, reset: bool) -> None:
        """The demo brand, prompt templates and A/B experiment with its seeded history (``experiments.demo``)."""
        from experiments.demo import experiments_demo_ensure, experiments_demo_remove

        if reset:
            self.stdout.write(f"Demo experiment: {experiments_demo_remove()} seeded ledger rows removed")
        result = experiments_demo_ensure()
        experiment = result.experiment
        try:
            where = reverse("experiment-results-page", args=[experiment.pk])
        except NoReverseMatch:
            where = "/experiments/"
        if result.problem:
            self.stderr.write(self.style.WARNING(f"warning: the demo experiment stays a draft: {result.problem}"))
        if result.seeded:
            self.stdout.write(self.style.SUCCESS(f"Demo experiment {experiment.name!r} ({experiment.status}): {where}"))
        else:
            self.stdout.write(f"Demo experiment {experiment.name!r} ({experiment.status}), as it was: {where}")

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


def demo_catalog_load(*, east_url: str, west_url: str, environ: Mapping[str, str]) -> LoadResult:
    """Load the demo catalog, and each real provider's file whose variable is set in ``environ``, in one
    ``providers_load`` call (all or nothing). Raises ``ApplicationError`` naming the file's problem."""
    env = {name: value.strip() for name, value in environ.items()}
    env["LLMHUB_DEMO_EAST_URL"] = _origin(east_url)
    env["LLMHUB_DEMO_WEST_URL"] = _origin(west_url)
    if env.get("OLLAMA_BASE_URL"):
        # The file adds /v1 (where Ollama speaks the OpenAI protocol); people give the root, or the /v1 URL.
        env["OLLAMA_BASE_URL"] = env["OLLAMA_BASE_URL"].rstrip("/").removesuffix("/v1")
    files = [DEMO_CATALOG] + [path for variable, path in ENV_CATALOGS.items() if env.get(variable)]
    data: dict[str, list[Any]] = {"providers": [], "models": []}
    for path in files:
        try:
            part = catalog_yaml_parse(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ApplicationError(f"{path} cannot be read: {exc}") from None
        if not isinstance(part, dict):
            raise ApplicationError(f"{path}: expected providers: and models: sections.")
        for section, entries in data.items():
            found = part.get(section) or []
            if not isinstance(found, list):
                raise ApplicationError(f"{path}: {section} must be a list.")
            entries.extend(found)
    return providers_load(data=data, env=env)


def _origin(url: str) -> str:
    """``http://host:port`` of a URL given with or without a path (the catalog file adds the path)."""
    target = urlsplit(url)
    return f"{target.scheme}://{target.netloc}"
