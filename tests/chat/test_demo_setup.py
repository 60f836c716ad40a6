"""``manage.py demo_setup``: the demo catalog comes from ``llmhub/demo/`` through the catalog-file loader,
and the file loads by hand (``loadproviders``) into exactly what ``make run`` writes.

``tests/test_project.py`` runs the whole of ``make run`` in a clean copy of the project; these run the
command in-process, against the test database.
"""

from __future__ import annotations

import io
import re
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.models import UsageRecord
from billing.services.keys import api_key_create
from chat.management.commands.demo_setup import ADMIN_USERNAME
from experiments.assignment import assignment_unit, experiment_assign
from experiments.demo import EXPERIMENT_NAME
from experiments.models import Experiment, ExperimentStatus, Feedback
from prompts.models import BrandProfile, PromptTemplate
from providers.models import CatalogModel, Deployment, ModelMode, Provider
from providers.services.catalog_file import providers_dump
from tests.billing.conftest import plans  # noqa: F401  (a fixture)
from tests.providers.health_probes import breakers_closed_after  # noqa: F401  (a fixture)

pytestmark = pytest.mark.django_db

EAST, WEST = "http://127.0.0.1:28080", "http://127.0.0.1:28082"
REAL_PROVIDER_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OLLAMA_BASE_URL")


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path, monkeypatch):
    """The demo logins' passwords go to a folder of the test's own; no real provider unless a test says so."""
    settings.LOCAL_DIR = tmp_path / ".local"
    for variable in REAL_PROVIDER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def demo_setup(**options: str) -> str:
    out = io.StringIO()
    options = {"upstream_url": EAST, "west_upstream_url": WEST, **options}
    call_command("demo_setup", stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue()


def deployments(model: str) -> dict[str, Deployment]:
    return {row.name: row for row in Deployment.objects.filter(model__name=model).select_related("provider")}


def test_demo_setup_writes_the_demo_catalog():
    demo_setup()

    providers = {row.name: row for row in Provider.objects.all()}
    assert {name: (row.kind, row.base_url) for name, row in providers.items()} == {
        "demo-fake-openai": ("openai_compatible", f"{EAST}/v1"),
        "demo-fake-openai-west": ("openai_compatible", f"{WEST}/v1"),
        "demo-fake-anthropic": ("anthropic", EAST),
    }
    assert all(row.api_key.reveal() for row in providers.values()), "the SDKs insist on a key, even a fake one"

    mini = CatalogModel.objects.get(name="demo-gpt-4o-mini")
    assert mini.fallbacks == ["demo-claude-haiku"]
    assert (mini.context_window, mini.max_output_tokens) == (128_000, 16_384)
    served = deployments("demo-gpt-4o-mini")
    assert {name: (row.provider.name, row.upstream_id, row.weight) for name, row in served.items()} == {
        "east": ("demo-fake-openai", "fake-gpt-4o-mini", 3),
        "west": ("demo-fake-openai-west", "fake-gpt-4o-mini", 1),
    }
    for row in served.values():
        assert (row.input_per_mtok, row.output_per_mtok, row.cached_input_per_mtok) == (
            Decimal("0.15"),
            Decimal("0.60"),
            Decimal("0.075"),
        )

    assert CatalogModel.objects.get(name="demo-gpt-4o").supports_vision
    assert not CatalogModel.objects.get(name="demo-claude-haiku").supports_vision
    # The fake upstream's Claude thinks when asked (its thinking budget honoured): the chat page offers the control.
    reasoning = set(CatalogModel.objects.filter(supports_reasoning=True).values_list("name", flat=True))
    assert reasoning == {"demo-claude-haiku"}
    embedding = CatalogModel.objects.get(name="demo-embedding-small")
    assert (embedding.mode, embedding.context_window) == (ModelMode.EMBEDDING, 8192)
    haiku = deployments("demo-claude-haiku")["demo-fake-anthropic"]
    assert (haiku.upstream_id, haiku.output_per_mtok) == ("fake-claude-haiku", Decimal("4.00"))
    assert set(CatalogModel.objects.values_list("name", flat=True)) == {
        "demo-gpt-4o-mini",
        "demo-gpt-4o",
        "demo-embedding-small",
        "demo-claude-haiku",
    }


def test_the_demo_admins_chat_page_offers_the_reasoning_control_for_the_demo_claude(client):
    """``make run``'s catalog and admin: the picker marks the model that reasons, for which the page shows its
    Reasoning control (``chat.js``), and no other."""
    demo_setup()
    client.force_login(get_user_model().objects.get(username=ADMIN_USERNAME))

    page = client.get("/").content.decode()

    options = re.findall(r'<option value="([^"]+)"[^>]*?( data-reasoning="true")?>', page)
    assert {name for name, reasoning in options if reasoning} == {"demo-claude-haiku"}
    assert "demo-gpt-4o-mini" in {name for name, _ in options}


def test_demo_setup_twice_changes_nothing():
    demo_setup()
    catalog = providers_dump()

    again = demo_setup()

    rows = [line for line in again.splitlines() if line.startswith(("provider ", "model ", "deployment "))]
    assert len(rows) == 3 + 4 + 5
    assert all(line.split(": ", 1)[1].startswith("unchanged") for line in rows), again
    assert providers_dump() == catalog


def test_the_demo_file_loaded_by_hand_is_what_demo_setup_writes(monkeypatch):
    """The README calls llmhub/demo/providers.yaml the demo catalog: loading it as its comment says finds
    every row of demo_setup's already right."""
    demo_setup()
    catalog = providers_dump()
    monkeypatch.setenv("LLMHUB_DEMO_EAST_URL", EAST)
    monkeypatch.setenv("LLMHUB_DEMO_WEST_URL", WEST)
    out = io.StringIO()

    call_command("loadproviders", str(Path(settings.BASE_DIR) / "llmhub" / "demo" / "providers.yaml"), stdout=out)

    assert out.getvalue().splitlines()[-1] == "0 created, 0 updated, 12 unchanged.", out.getvalue()
    assert providers_dump() == catalog


@pytest.mark.usefixtures("breakers_closed_after")
def test_every_demo_deployment_passes_its_health_check(fake_upstream):
    """Beat probes every deployment every 5 minutes from the start of ``make run``: each provider's model
    list must name each of its deployments' upstream ids, or the demo opens an incident on its own (it did
    for ``demo-embedding-small``, and the operations dashboard showed a failing deployment)."""
    from providers.models import HealthCheck
    from providers.tasks import providers_health_check_all

    demo_setup(upstream_url=fake_upstream.base_url, west_upstream_url=fake_upstream.base_url)

    providers_health_check_all.delay().get()

    results = {(c.deployment.model.name, c.deployment.name): (c.ok, c.error) for c in HealthCheck.objects.all()}
    assert len(results) == Deployment.objects.count() == 5
    assert all(ok for ok, _ in results.values()), results


def test_demo_setup_follows_the_upstream_it_is_given():
    demo_setup()

    moved = demo_setup(upstream_url="http://127.0.0.1:38080/")

    assert "provider demo-fake-openai: updated" in moved
    assert "provider demo-fake-openai-west: unchanged" in moved
    assert Provider.objects.get(name="demo-fake-openai").base_url == "http://127.0.0.1:38080/v1"
    assert Provider.objects.get(name="demo-fake-anthropic").base_url == "http://127.0.0.1:38080"


def test_real_providers_join_when_their_variable_is_set(monkeypatch):
    openai_key, anthropic_key = "sk-test-0123456789abcdef", "sk-ant-test-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", f" {openai_key}\n")  # pasted with a space and a newline
    monkeypatch.setenv("ANTHROPIC_API_KEY", anthropic_key)
    monkeypatch.setenv("OLLAMA_BASE_URL", "http://127.0.0.1:11434/v1/")

    output = demo_setup()

    assert openai_key not in output and anthropic_key not in output
    providers = {row.name: row for row in Provider.objects.all()}
    assert providers["openai"].api_key.reveal() == openai_key
    assert providers["anthropic"].api_key.reveal() == anthropic_key
    assert providers["ollama"].base_url == "http://127.0.0.1:11434/v1"
    served_by = dict(
        CatalogModel.objects.exclude(name__startswith="demo-").values_list("name", "deployments__provider__name")
    )
    assert served_by == {
        "gpt-4o-mini": "openai",
        "gpt-4o": "openai",
        "claude-haiku-4-5": "anthropic",
        "claude-sonnet-4-5": "anthropic",
        "llama3.2": "ollama",
        "qwen2.5": "ollama",
    }
    sonnet = deployments("claude-sonnet-4-5")["anthropic"]
    assert (sonnet.input_per_mtok, sonnet.output_per_mtok) == (Decimal("3.00"), Decimal("15.00"))

    # A later run without the variables leaves them in the catalog.
    for variable in REAL_PROVIDER_VARIABLES:
        monkeypatch.delenv(variable)
    demo_setup()
    assert Provider.objects.filter(name__in=["openai", "anthropic", "ollama"]).count() == 3


def test_a_catalog_that_does_not_load_writes_nothing(monkeypatch):
    """The demo files load in one call: one bad value stops the whole catalog, demo providers included."""
    monkeypatch.setenv("OLLAMA_BASE_URL", "not a url")

    with pytest.raises(CommandError, match="provider ollama: base_url"):
        demo_setup()

    assert not Provider.objects.exists()
    assert not CatalogModel.objects.exists()


def test_demo_setup_installs_the_demo_experiment_once():
    first = demo_setup()

    experiment = Experiment.objects.get(name=EXPERIMENT_NAME)
    assert experiment.status == ExperimentStatus.RUNNING
    assert experiment.model.name == "demo-gpt-4o-mini"
    assert f"Demo experiment {EXPERIMENT_NAME!r} (running): /experiments/{experiment.pk}/results/" in first
    assert BrandProfile.objects.exists() and PromptTemplate.objects.filter(kind="ad_copy").exists()
    history = (UsageRecord.objects.count(), Feedback.objects.count())
    assert history[0] > 1_000 and history[1] > 500

    again = demo_setup()

    assert f"Demo experiment {EXPERIMENT_NAME!r} (running), as it was" in again
    assert "created" not in again and "updated" not in again
    assert (UsageRecord.objects.count(), Feedback.objects.count()) == history
    assert Experiment.objects.get().pk == experiment.pk
    # The seeded spend is the demo users' own: the logins people use start with none.
    assert not UsageRecord.objects.filter(user__username__in=["admin", "demo"]).exists()


def test_reset_demo_experiment_seeds_it_afresh():
    demo_setup()
    before = Experiment.objects.get(name=EXPERIMENT_NAME)
    rows = UsageRecord.objects.count()

    out = demo_setup(reset_demo_experiment=True)

    assert f"Demo experiment: {rows} seeded ledger rows removed" in out
    after = Experiment.objects.get(name=EXPERIMENT_NAME)
    assert after.pk != before.pk and after.status == ExperimentStatus.RUNNING
    assert UsageRecord.objects.count() == rows
    assert set(UsageRecord.objects.exclude(experiment_id=None).values_list("experiment_id", flat=True)) == {after.pk}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("plans")
def test_the_demo_user_chats_through_the_demo_experiment(llmhub_server, fake_upstream):
    """After demo_setup the Free plan's demo user is in the demo experiment (its variant in the response's
    header, the one assignment gives them) and its seeded history blocks nothing of theirs. The plans are
    the data migration's (``plans``): an earlier transactional test's flush removes them, and without the
    Free plan demo_setup leaves the demo user on the default, every model."""
    demo_setup(upstream_url=fake_upstream.base_url, west_upstream_url=fake_upstream.base_url)
    demo = get_user_model().objects.get(username="demo")
    client = openai.OpenAI(
        base_url=llmhub_server.url + "/v1", api_key=api_key_create(user=demo, name="t").secret, max_retries=0
    )

    raw = client.chat.completions.with_raw_response.create(
        model="demo-gpt-4o-mini", messages=[{"role": "user", "content": "[[reply=hello from the demo]]"}]
    )

    assert raw.parse().choices[0].message.content == "hello from the demo"
    # What the README says the Free plan allows among the demo models: the one chat model, and the embedding one.
    assert sorted(model.id for model in client.models.list()) == ["demo-embedding-small", "demo-gpt-4o-mini"]
    experiment = Experiment.objects.get(name=EXPERIMENT_NAME)
    assigned = async_to_sync(experiment_assign)(
        model_id=experiment.model_id, unit=assignment_unit(user_id=demo.pk, api_key_id=None)
    )
    assert raw.headers.get("x-llmhub-experiment") == f"{EXPERIMENT_NAME}:{assigned.variant.name}"
