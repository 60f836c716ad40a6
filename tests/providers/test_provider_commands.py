"""loadproviders, dumpproviders and setupschedules, run as an operator would run them."""

from __future__ import annotations

import io
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError
from django_celery_beat.models import PeriodicTask

from chat.management.commands.setupschedules import SCHEDULES
from providers.fields import Secret
from providers.models import CatalogModel, Deployment, Provider
from tests.factories import ModelFactory, ProviderFactory

pytestmark = pytest.mark.django_db

UPSTREAM_KEY = "sk-from-the-environment-0123456789abcdef"

CATALOG = """
providers:
  - name: local-openai
    kind: openai_compatible
    base_url: http://127.0.0.1:18080/v1
    api_key: ${UPSTREAM_KEY}
    organization: ""
    extra_headers: {X-Team: research}
    timeout: 60
    max_retries: 2
    enabled: true
    models:
      - name: gpt-4o-mini
        upstream: gpt-4o-mini
        input_per_mtok: "0.15"
        output_per_mtok: "0.60"
        cached_input_per_mtok: "0.075"
        context_window: 128000
        max_output_tokens: 16384
        capabilities: {streaming: true, tools: true, vision: false, json_mode: true}
        parameter_rules: {}
        enabled: true
      - name: o3-mini
        upstream: o3-mini
        input_per_mtok: 1.1
        output_per_mtok: 4.4
        priority_price_factor: "2"
        flex_price_factor: "0.5"
        parameter_rules: {fixed: {temperature: 1}, rename: {max_tokens: max_completion_tokens}}
  - name: claude
    kind: anthropic
    base_url: http://127.0.0.1:18081
    models:
      - name: claude-haiku
        upstream: claude-3-5-haiku-latest
        input_per_mtok: "0.8"
        output_per_mtok: "4"
        cache_write_per_mtok: "1.00"
        cache_write_1h_per_mtok: "1.60"
        web_search_per_1k: "10.00"
        capabilities: {vision: true}
"""


def write(tmp_path: Path, text: str, name: str = "providers.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(path: Path) -> str:
    out = io.StringIO()
    call_command("loadproviders", str(path), stdout=out)
    return out.getvalue()


def snapshot() -> tuple[list[dict], list[dict], list[dict]]:
    providers = [
        {**row, "api_key": provider.api_key.reveal()}
        for provider, row in zip(
            Provider.objects.order_by("name"), Provider.objects.order_by("name").values(), strict=True
        )
    ]
    deployments = Deployment.objects.order_by("model__name", "name").values(
        "model__name", "provider__name", *(f.attname for f in Deployment._meta.concrete_fields)
    )
    return providers, list(CatalogModel.objects.order_by("name").values()), list(deployments)


def deployment_of(model_name: str) -> Deployment:
    """The one deployment a model of the older file shape has."""
    [deployment] = Deployment.objects.filter(model__name=model_name).select_related("provider")
    return deployment


@pytest.fixture
def catalog(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UPSTREAM_KEY", UPSTREAM_KEY)
    return write(tmp_path, CATALOG)


# loadproviders --------------------------------------------------------------------------------------


def test_load_creates_everything_and_never_prints_the_key(catalog):
    output = load(catalog)

    assert UPSTREAM_KEY not in output
    assert "provider local-openai: created (key set)" in output
    assert "provider claude: created (no key)" in output
    assert "model gpt-4o-mini: created" in output and "deployment gpt-4o-mini/local-openai: created" in output
    assert "8 created, 0 updated, 0 unchanged." in output  # 2 providers, 3 models, one deployment each
    local = Provider.objects.get(name="local-openai")
    assert local.api_key.reveal() == UPSTREAM_KEY  # ${UPSTREAM_KEY} resolved from the environment
    assert local.extra_headers == {"X-Team": Secret("research")} and local.timeout_seconds == Decimal("60")
    mini, on_local = CatalogModel.objects.get(name="gpt-4o-mini"), deployment_of("gpt-4o-mini")
    assert (on_local.input_per_mtok, on_local.output_per_mtok, on_local.cached_input_per_mtok) == (
        Decimal("0.15"),
        Decimal("0.60"),
        Decimal("0.075"),
    )
    assert mini.max_output_tokens == 16384 and on_local.provider == local and on_local.name == "local-openai"
    o3, o3_deployment = CatalogModel.objects.get(name="o3-mini"), deployment_of("o3-mini")
    # YAML floats, exactly
    assert o3_deployment.input_per_mtok == Decimal("1.1") and o3_deployment.output_per_mtok == Decimal("4.4")
    assert o3.parameter_rules["fixed"] == {"temperature": 1} and o3_deployment.cached_input_per_mtok is None
    haiku = CatalogModel.objects.get(name="claude-haiku")
    assert haiku.supports_vision and haiku.supports_tools and deployment_of("claude-haiku").provider.name == "claude"


def test_loading_twice_leaves_the_same_rows(catalog):
    load(catalog)
    first = snapshot()

    output = load(catalog)

    assert snapshot() == first  # same count, same values, not even updated_at moved
    assert "provider local-openai: unchanged (key kept)" in output
    assert "0 created, 0 updated, 8 unchanged." in output


def test_load_updates_changed_fields(catalog, tmp_path, monkeypatch):
    load(catalog)
    monkeypatch.setenv("UPSTREAM_KEY", "sk-rotated-upstream-key-99999999999")
    changed = CATALOG.replace('input_per_mtok: "0.15"', 'input_per_mtok: "0.20"').replace(
        "base_url: http://127.0.0.1:18081", "base_url: http://127.0.0.1:18082"
    )

    output = load(write(tmp_path, changed, "changed.yaml"))

    assert "provider local-openai: updated (key changed)" in output
    # The price is the deployment's: the model row itself did not change.
    assert "deployment gpt-4o-mini/local-openai: updated" in output and "model gpt-4o-mini: unchanged" in output
    assert "model o3-mini: unchanged" in output and "deployment o3-mini/local-openai: unchanged" in output
    assert "provider claude: updated (no key)" in output
    assert deployment_of("gpt-4o-mini").input_per_mtok == Decimal("0.20")
    assert Provider.objects.get(name="local-openai").api_key.reveal() == "sk-rotated-upstream-key-99999999999"
    assert Provider.objects.count() == 2 and CatalogModel.objects.count() == 3 and Deployment.objects.count() == 3


def test_absent_key_keeps_the_stored_one_and_empty_key_clears_it(tmp_path):
    ProviderFactory(name="keyed", api_key="sk-set-in-the-admin-0000000000")
    entry = (
        "providers:\n  - {name: keyed, kind: openai_compatible, base_url: 'http://127.0.0.1:9/v1', max_retries: 0}\n"
    )

    output = load(write(tmp_path, entry))
    assert "provider keyed: updated (key kept)" in output  # timeout went back to the default
    assert Provider.objects.get(name="keyed").api_key.reveal() == "sk-set-in-the-admin-0000000000"

    output = load(write(tmp_path, entry.replace("max_retries: 0}", "max_retries: 0, api_key: ''}")))
    assert "provider keyed: updated (key cleared)" in output
    assert not Provider.objects.get(name="keyed").api_key


def test_missing_environment_variable_names_it_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.delenv("CLAUDE_KEY", raising=False)
    text = CATALOG.replace(
        "    base_url: http://127.0.0.1:18081\n", "    base_url: http://127.0.0.1:18081\n    api_key: ${CLAUDE_KEY}\n"
    )

    with pytest.raises(CommandError) as excinfo:
        load(write(tmp_path, text))

    assert "CLAUDE_KEY" in str(excinfo.value) and "provider claude" in str(excinfo.value)
    assert "Nothing was written" in str(excinfo.value)
    assert not Provider.objects.exists() and not CatalogModel.objects.exists()


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (
            "kind: openai_compatible\n    base_url: http://127.0.0.1:18080/v1",
            "kind: Value 'nonsense' is not a valid choice",
        ),
        ("base_url: http://127.0.0.1:18080/v1", "base_url: Give an http(s) URL"),
        ('input_per_mtok: "0.15"', "model gpt-4o-mini: input_per_mtok must be a number"),
        ("context_window: 128000", "model gpt-4o-mini: context_window must be a whole number"),
        ("parameter_rules: {}", "model gpt-4o-mini: parameter_rules:"),
        ("enabled: true\n      - name: o3-mini", "model gpt-4o-mini: unknown key(s) enabeld"),
    ],
)
def test_invalid_entries_name_the_row_and_write_nothing(catalog, tmp_path, broken, expected):
    replacement = {
        "kind: openai_compatible\n    base_url: http://127.0.0.1:18080/v1": "kind: nonsense\n    base_url: http://127.0.0.1:18080/v1",
        "base_url: http://127.0.0.1:18080/v1": "base_url: ftp://127.0.0.1/v1",
        'input_per_mtok: "0.15"': 'input_per_mtok: "fifteen cents"',
        "context_window: 128000": "context_window: big",
        "parameter_rules: {}": "parameter_rules: {drop: temperature}",
        "enabled: true\n      - name: o3-mini": "enabeld: true\n      - name: o3-mini",
    }[broken]
    # The broken row comes after a valid provider, so an error must undo what was already written.
    text = CATALOG.replace(
        "providers:\n", "providers:\n  - {name: first-ok, kind: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
    )
    assert broken in text
    path = write(tmp_path, text.replace(broken, replacement, 1))

    with pytest.raises(CommandError) as excinfo:
        load(path)

    assert expected in str(excinfo.value)
    assert UPSTREAM_KEY not in str(excinfo.value)
    assert not Provider.objects.exists() and not CatalogModel.objects.exists()


def test_duplicate_names_and_bad_files_are_refused(tmp_path):
    twice = "providers:\n  - {name: a, kind: openai}\n  - {name: a, kind: anthropic}\n"
    with pytest.raises(CommandError, match="provider a appears more than once"):
        load(write(tmp_path, twice))
    with pytest.raises(CommandError, match="not valid YAML"):
        load(write(tmp_path, "providers: [\n"))
    with pytest.raises(CommandError, match="providers must be a list"):
        load(write(tmp_path, "providers: {}\n"))
    with pytest.raises(CommandError, match="cannot read"):
        load(tmp_path / "missing.yaml")
    assert not Provider.objects.exists()


# dumpproviders --------------------------------------------------------------------------------------


def test_dump_has_no_secret_and_round_trips(catalog, tmp_path, monkeypatch):
    load(catalog)
    azure = ProviderFactory(
        name="azure-east", extra_headers={"api-key": "azure-header-secret-123", "X-Region": "east"}, api_key=""
    )
    ModelFactory(name="az-gpt", provider=azure, input_per_mtok=Decimal("2.500000"), max_output_tokens=None)
    before = snapshot()
    out = io.StringIO()

    call_command("dumpproviders", stdout=out)

    text = out.getvalue()
    assert UPSTREAM_KEY not in text and "azure-header-secret-123" not in text
    dumped = yaml.safe_load(text)
    local = next(entry for entry in dumped["providers"] if entry["name"] == "local-openai")
    assert local["api_key"] == "${LOCAL_OPENAI_API_KEY}"
    assert "api_key" not in next(entry for entry in dumped["providers"] if entry["name"] == "claude")
    az = next(entry for entry in dumped["providers"] if entry["name"] == "azure-east")
    assert az["extra_headers"] == {"X-Region": "east", "api-key": "${AZURE_EAST_HEADER_API_KEY}"}
    assert "models" not in az and "max_retries" not in az
    az_gpt = next(entry for entry in dumped["models"] if entry["name"] == "az-gpt")
    assert az_gpt["deployments"] == [
        {
            "provider": "azure-east",
            "upstream": "fake-gpt-4o-mini",
            "input_per_mtok": "2.5",
            "output_per_mtok": "0.6",
            "weight": 1,
            "priority": 0,
            "enabled": True,
        }
    ]

    # On another machine: an empty catalog and the variables the dump refers to.
    target = tmp_path / "dump.yaml"
    call_command("dumpproviders", "-o", str(target), stderr=io.StringIO())
    assert target.read_text() == text
    CatalogModel.objects.all().delete()
    Provider.objects.all().delete()
    monkeypatch.setenv("LOCAL_OPENAI_API_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("AZURE_EAST_HEADER_API_KEY", "azure-header-secret-123")
    load(target)

    def comparable(rows: list[dict]) -> list[dict]:
        return [
            {
                key: value
                for key, value in row.items()
                if key not in {"id", "provider_id", "model_id", "created_at", "updated_at"}
            }
            for row in rows
        ]

    after = snapshot()
    for rows_after, rows_before in zip(after, before, strict=True):
        assert comparable(rows_after) == comparable(rows_before)


EMBEDDING_CATALOG = """
providers:
  - name: local-openai
    kind: openai_compatible
    base_url: http://127.0.0.1:18080/v1
    models:
      - name: chatty
        upstream: gpt-4o-mini
        input_per_mtok: "0.15"
        output_per_mtok: "0.60"
      - name: embedder
        upstream: text-embedding-3-small
        mode: embedding
        input_per_mtok: "0.02"
        output_per_mtok: "0"
"""


def test_mode_loads_dumps_round_trips_and_is_checked(tmp_path):
    path = write(tmp_path, EMBEDDING_CATALOG)
    load(path)
    assert dict(CatalogModel.objects.values_list("name", "mode")) == {"chatty": "chat", "embedder": "embedding"}

    out = io.StringIO()
    call_command("dumpproviders", stdout=out)
    dumped = {model["name"]: model for model in yaml.safe_load(out.getvalue())["models"]}
    assert (dumped["chatty"]["mode"], dumped["embedder"]["mode"]) == ("chat", "embedding")
    CatalogModel.objects.all().delete()
    load(write(tmp_path, out.getvalue(), "dump.yaml"))
    assert dict(CatalogModel.objects.values_list("name", "mode")) == {"chatty": "chat", "embedder": "embedding"}

    output = load(write(tmp_path, EMBEDDING_CATALOG.replace("mode: embedding", "mode: chat"), "changed.yaml"))
    assert "model embedder: updated" in output and CatalogModel.objects.get(name="embedder").mode == "chat"

    with pytest.raises(CommandError) as refused:
        load(write(tmp_path, EMBEDDING_CATALOG.replace("mode: embedding", "mode: rerank"), "bad.yaml"))
    assert "model embedder: mode:" in str(refused.value) and "rerank" in str(refused.value)
    assert CatalogModel.objects.get(name="embedder").mode == "chat"  # nothing written


def test_dump_of_an_empty_catalog_loads_back():
    out = io.StringIO()
    call_command("dumpproviders", stdout=out)
    assert yaml.safe_load(out.getvalue()) == {"providers": [], "models": []}


# setupschedules -------------------------------------------------------------------------------------


def test_setupschedules_is_idempotent_and_keeps_an_admins_disabling():
    call_command("setupschedules", stdout=io.StringIO())
    tasks = {task.name: task for task in PeriodicTask.objects.all()}
    assert set(tasks) == {name for name, _, _ in SCHEDULES}
    health = tasks["providers: health check"]
    assert health.task == "providers.tasks.providers_health_check_all"
    assert health.interval.every == 300 and health.crontab is None and health.enabled
    rotation = tasks["providers: re-encrypt secrets"]
    assert rotation.crontab.hour == "3" and rotation.crontab.minute == "17" and rotation.interval is None
    PeriodicTask.objects.filter(pk=health.pk).update(enabled=False, task="stale.path")

    out = io.StringIO()
    call_command("setupschedules", stdout=out)

    assert "providers: health check: updated" in out.getvalue()
    again = {task.name: task for task in PeriodicTask.objects.all()}
    assert {name: task.pk for name, task in again.items()} == {name: task.pk for name, task in tasks.items()}
    assert again["providers: health check"].task == "providers.tasks.providers_health_check_all"
    assert not again["providers: health check"].enabled


@pytest.mark.django_db
def test_an_azure_provider_loads_and_dumps_with_its_api_version(tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_EAST_KEY", "azure-secret")
    path = tmp_path / "azure.yaml"
    path.write_text(
        textwrap.dedent(
            """
            providers:
              - name: azure-east
                kind: azure_openai
                base_url: https://my-resource.openai.azure.com
                api_version: "2024-10-21"
                api_key: ${AZURE_EAST_KEY}
                models:
                  - {name: gpt-4o-azure, upstream: my-deployment, input_per_mtok: "2.50", output_per_mtok: "10.00"}
            """
        )
    )
    load(path)
    assert Provider.objects.get(name="azure-east").api_version == "2024-10-21"

    out = io.StringIO()
    call_command("dumpproviders", stdout=out)
    [dumped] = yaml.safe_load(out.getvalue())["providers"]
    assert dumped["api_version"] == "2024-10-21"


# The models: section (deployments, aliases, routing) -----------------------------------------------

ROUTED = """
providers:
  - {name: east, kind: openai_compatible, base_url: http://127.0.0.1:18080/v1, api_key: ${EAST_KEY}}
  - {name: west, kind: openai_compatible, base_url: http://127.0.0.1:18082/v1, api_key: ${WEST_KEY}}
models:
  - name: gpt-4o-mini
    strategy: weighted            # weighted | priority | lowest_latency | least_busy | cheapest
    retries: 2
    fallbacks: [claude-haiku]     # other public names, tried in order
    context_window_fallbacks: [gpt-4o-long]
    deployments:
      - {provider: east, upstream: gpt-4o-mini, weight: 3, input_per_mtok: "0.15", output_per_mtok: "0.60"}
      - {provider: west, upstream: gpt-4o-mini, weight: 1, input_per_mtok: "0.15", output_per_mtok: "0.60"}
  - name: claude-haiku
    label: Claude Haiku
    strategy: priority
    retries: 0
    resume_on_failure: true
    stream_idle_timeout: 12.5
    deployments:
      - {provider: east, upstream: claude-3-5-haiku, priority: 0, input_per_mtok: "0.8", output_per_mtok: "4",
         rpm_limit: 600, tpm_limit: 90000, quality: "0.92", breaker_override: closed, paid_health_probe: true}
      - {name: east-backup, provider: east, upstream: claude-3-5-haiku-b, priority: 1, input_per_mtok: "1",
         output_per_mtok: "5", enabled: false}
  - name: gpt-4o-long
    context_window: 1000000
    deployments:
      - {provider: west, upstream: gpt-4o-long, input_per_mtok: "2", output_per_mtok: "8"}
  - {name: chat-default, alias_of: gpt-4o-mini}
"""


@pytest.fixture
def routed(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EAST_KEY", "sk-east-0000000000000000000000")
    monkeypatch.setenv("WEST_KEY", "sk-west-0000000000000000000000")
    return write(tmp_path, ROUTED, "routed.yaml")


def dump() -> str:
    out = io.StringIO()
    call_command("dumpproviders", stdout=out)
    return out.getvalue()


def test_the_issues_example_loads_models_with_their_deployments_and_an_alias(routed):
    output = load(routed)

    mini = CatalogModel.objects.get(name="gpt-4o-mini")
    assert (mini.strategy, mini.retries, mini.fallbacks, mini.context_window_fallbacks) == (
        "weighted",
        2,
        ["claude-haiku"],
        ["gpt-4o-long"],
    )
    deployments = {d.name: d for d in mini.deployments.select_related("provider")}
    assert set(deployments) == {"east", "west"}  # named after their providers
    assert deployments["east"].weight == 3 and deployments["west"].weight == 1
    assert deployments["west"].provider.name == "west" and deployments["west"].upstream_id == "gpt-4o-mini"
    assert deployments["east"].input_per_mtok == Decimal("0.15")
    haiku = CatalogModel.objects.get(name="claude-haiku")
    primary, backup = haiku.deployments.order_by("priority")
    assert (primary.rpm_limit, primary.tpm_limit, primary.quality) == (600, 90000, Decimal("0.92"))
    assert primary.breaker_override == "closed" and primary.paid_health_probe
    assert backup.name == "east-backup" and not backup.enabled and backup.provider.name == "east"
    assert haiku.label == "Claude Haiku" and haiku.resume_on_failure
    assert haiku.stream_idle_timeout_seconds == Decimal("12.5")
    alias = CatalogModel.objects.get(name="chat-default")
    assert alias.alias_of == mini and not alias.deployments.exists()
    assert "deployment gpt-4o-mini/west: created" in output and "model chat-default: created" in output
    assert "11 created, 0 updated, 0 unchanged." in output  # 2 providers, 4 models, 5 deployments


def test_the_new_format_round_trips_dump_load_dump(routed, tmp_path, monkeypatch):
    load(routed)
    first = dump()

    assert "sk-east" not in first and "${EAST_API_KEY}" in first
    dumped = yaml.safe_load(first)
    assert "models" not in dumped["providers"][0]
    by_name = {entry["name"]: entry for entry in dumped["models"]}
    assert by_name["chat-default"] == {"name": "chat-default", "alias_of": "gpt-4o-mini"}
    assert [d["provider"] for d in by_name["gpt-4o-mini"]["deployments"]] == ["east", "west"]
    assert "name" not in by_name["gpt-4o-mini"]["deployments"][0]  # the provider's name, the default
    assert by_name["claude-haiku"]["deployments"][1]["name"] == "east-backup"
    assert by_name["claude-haiku"]["deployments"][0]["quality"] == "0.92"

    # The same database: loading its own dump changes nothing, and dumps the same text again.
    path = write(tmp_path, first, "dump.yaml")
    monkeypatch.setenv("EAST_API_KEY", "sk-east-0000000000000000000000")
    monkeypatch.setenv("WEST_API_KEY", "sk-west-0000000000000000000000")
    before = snapshot()
    output = load(path)
    assert "0 created, 0 updated, 11 unchanged." in output and snapshot() == before
    assert dump() == first

    # An empty database: the dump rebuilds the same catalog.
    CatalogModel.objects.all().delete()
    Provider.objects.all().delete()
    load(path)
    assert dump() == first


def test_the_old_format_dumps_in_the_new_one_and_loads_back_the_same(catalog, tmp_path, monkeypatch):
    load(catalog)
    first = dump()
    assert "models" in yaml.safe_load(first) and all("models" not in p for p in yaml.safe_load(first)["providers"])
    CatalogModel.objects.all().delete()
    Provider.objects.all().delete()
    monkeypatch.setenv("LOCAL_OPENAI_API_KEY", UPSTREAM_KEY)

    load(write(tmp_path, first, "dump.yaml"))

    assert dump() == first
    assert deployment_of("gpt-4o-mini").cached_input_per_mtok == Decimal("0.075")
    # A cache-write price goes out and comes back; a deployment without one dumps none (the input price).
    assert deployment_of("claude-haiku").cache_write_per_mtok == Decimal("1.00")
    by_name = {entry["name"]: entry for entry in yaml.safe_load(first)["models"]}
    assert by_name["claude-haiku"]["deployments"][0]["cache_write_per_mtok"] == "1"
    assert "cache_write_per_mtok" not in by_name["gpt-4o-mini"]["deployments"][0]
    assert deployment_of("gpt-4o-mini").cache_write_per_mtok is None
    # The 1-hour cache's price likewise.
    assert deployment_of("claude-haiku").cache_write_1h_per_mtok == Decimal("1.60")
    assert by_name["claude-haiku"]["deployments"][0]["cache_write_1h_per_mtok"] == "1.6"
    assert "cache_write_1h_per_mtok" not in by_name["gpt-4o-mini"]["deployments"][0]
    assert deployment_of("gpt-4o-mini").cache_write_1h_per_mtok is None
    # The web searches' price too; left out, it is 0 and not dumped.
    assert deployment_of("claude-haiku").web_search_per_1k == Decimal(10)
    assert by_name["claude-haiku"]["deployments"][0]["web_search_per_1k"] == "10"
    assert "web_search_per_1k" not in by_name["gpt-4o-mini"]["deployments"][0]
    assert deployment_of("gpt-4o-mini").web_search_per_1k == 0
    # OpenAI's service tiers' price factors; left out, none (the tier at the standard prices), not dumped.
    assert (deployment_of("o3-mini").priority_price_factor, deployment_of("o3-mini").flex_price_factor) == (2, 0.5)
    assert by_name["o3-mini"]["deployments"][0]["priority_price_factor"] == "2"
    assert by_name["o3-mini"]["deployments"][0]["flex_price_factor"] == "0.5"
    assert "priority_price_factor" not in by_name["gpt-4o-mini"]["deployments"][0]
    assert deployment_of("gpt-4o-mini").priority_price_factor is None


def test_max_retries_on_a_provider_is_ignored_with_a_warning(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    path = write(
        tmp_path, "providers:\n  - {name: old, kind: openai, base_url: 'http://127.0.0.1:9/v1', max_retries: 4}\n"
    )

    call_command("loadproviders", str(path), stdout=out, stderr=err)

    assert "provider old: created" in out.getvalue()
    assert "warning: provider old: max_retries is ignored: retries are set per model now" in err.getvalue()


def test_a_deployment_the_file_no_longer_lists_is_removed_and_others_are_kept(routed, tmp_path):
    load(routed)
    kept = Deployment.objects.get(model__name="gpt-4o-mini", name="east")
    fewer = ROUTED.replace(
        '      - {provider: west, upstream: gpt-4o-mini, weight: 1, input_per_mtok: "0.15", output_per_mtok: "0.60"}\n',
        "",
    ).replace("weight: 3", "weight: 5")

    output = load(write(tmp_path, fewer, "fewer.yaml"))

    assert "deployment gpt-4o-mini/west: removed" in output and "deployment gpt-4o-mini/east: updated" in output
    assert ", 1 removed." in output
    assert list(Deployment.objects.filter(model__name="gpt-4o-mini").values_list("pk", "weight")) == [(kept.pk, 5)]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("retries: 2\n", "retries: 2\n    retry: 3\n", "model gpt-4o-mini: unknown key(s) retry"),
        ("weight: 3,", "weight: 3, wieght: 1,", "model gpt-4o-mini, deployment #1 (east): unknown key(s) wieght"),
        ("name: east-backup,", "name: east-backup, colour: red,", "deployment east-backup: unknown key(s) colour"),
        (
            "{name: chat-default, alias_of: gpt-4o-mini}",
            "{name: chat-default, alias_of: gpt-4o-mini, deployments: []}",
            "model chat-default: an alias has no deployments of its own",
        ),
        (
            "{name: chat-default, alias_of: gpt-4o-mini}",
            "{name: chat-default, alias_of: gpt-4o-mini, retries: 1}",
            "model chat-default: an alias takes only name, label, alias_of and enabled, not retries",
        ),
        (
            "{name: chat-default, alias_of: gpt-4o-mini}",
            "{name: chat-default, alias_of: gpt-5}",
            "model chat-default: alias_of names no model",
        ),
        (
            "fallbacks: [claude-haiku]",
            "fallbacks: [claude-opus]",
            "model gpt-4o-mini: fallbacks: claude-opus: no such model",
        ),
        ("fallbacks: [claude-haiku]", "fallbacks: [chat-default]", "model gpt-4o-mini: fallbacks: A model cannot fall"),
        (
            "    strategy: priority\n",
            "    strategy: priority\n    fallbacks: [chat-default]\n",
            # through the alias: chat-default is gpt-4o-mini
            "model gpt-4o-mini: fallbacks: This makes a cycle: gpt-4o-mini → claude-haiku → gpt-4o-mini.",
        ),
        ("strategy: weighted ", "strategy: fastest ", "model gpt-4o-mini: strategy: Value 'fastest'"),
        # A cap of 0 would send the deployment nothing: refused, saying how to mean "no cap" or "no traffic".
        ("rpm_limit: 600", "rpm_limit: 0", "rpm_limit: 0 would send this deployment nothing"),
        ("tpm_limit: 90000", "tpm_limit: 0", "tpm_limit: 0 would send this deployment nothing"),
        # A window or a reply of 0 tokens holds nothing: refused, saying what to write instead.
        (
            "    retries: 2\n",
            "    retries: 2\n    context_window: 0\n",
            "model gpt-4o-mini: context_window: A context window of 0",
        ),
        (
            "    retries: 2\n",
            "    retries: 2\n    max_output_tokens: 0\n",
            "model gpt-4o-mini: max_output_tokens: 0 would be a model that writes nothing",
        ),
        (
            "rpm_limit: 600,",
            'rpm_limit: 600, priority_price_factor: "0",',
            "priority_price_factor: 0 would charge this tier nothing",
        ),
        (
            "provider: west, upstream: gpt-4o-long",
            "provider: north, upstream: gpt-4o-long",
            "provider north is in neither the file nor the catalog",
        ),
        (
            "{name: east-backup, provider: east,",
            "{provider: east,",
            "deployment east appears more than once in the model: give each a name",
        ),
        (
            "    deployments:\n      - {provider: west, upstream: gpt-4o-long, "
            'input_per_mtok: "2", output_per_mtok: "8"}\n',
            "",
            "model gpt-4o-long: an enabled model needs at least one deployment",
        ),
    ],
)
def test_invalid_models_name_their_entry_and_write_nothing(routed, tmp_path, old, new, expected):
    assert old in ROUTED
    path = write(tmp_path, ROUTED.replace(old, new, 1), "broken.yaml")

    with pytest.raises(CommandError) as excinfo:
        load(path)

    assert expected in str(excinfo.value) and "Nothing was written" in str(excinfo.value)
    assert not Provider.objects.exists() and not CatalogModel.objects.exists() and not Deployment.objects.exists()


def test_a_models_section_may_name_providers_already_in_the_catalog(tmp_path):
    ProviderFactory(name="stored")
    path = write(
        tmp_path,
        "models:\n  - name: solo\n    deployments:\n"
        "      - {provider: stored, upstream: up, input_per_mtok: 1, output_per_mtok: 2}\n",
    )

    assert "model solo: created" in load(path)
    assert deployment_of("solo").provider.name == "stored"


def test_references_are_quoted_only_when_the_file_needs_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EAST_KEY", "sk-east-0000000000000000000000")
    monkeypatch.setenv("TEAM", "research")
    # As the issue writes it: a bare reference in a flow mapping, which YAML alone does not parse.
    flow = "providers:\n  - {name: east, kind: openai, base_url: 'http://127.0.0.1:9/v1', api_key: ${EAST_KEY}}\n"
    # Valid YAML as it is, with a reference inside a quoted string that quoting would break: left alone.
    quoted = (
        "providers:\n  - name: west\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n"
        '    extra_headers: {X-Team: "team ${TEAM}, platform"}\n'
    )

    load(write(tmp_path, flow, "flow.yaml"))
    load(write(tmp_path, quoted, "quoted.yaml"))

    assert Provider.objects.get(name="east").api_key.reveal() == "sk-east-0000000000000000000000"
    assert Provider.objects.get(name="west").extra_headers == {"X-Team": Secret("team research, platform")}


SEARCHING = """
providers:
  - {name: east, kind: openai, base_url: 'http://127.0.0.1:9/v1'}
models:
  - name: searching
    deployments:
      - {name: preview, provider: east, upstream: gpt-4o-search-preview, input_per_mtok: 2.5, output_per_mtok: 10}
      - {name: sonar, provider: east, upstream: sonar, input_per_mtok: 1, output_per_mtok: 1,
         searches_every_request: always}
      - {name: told-not, provider: east, upstream: gpt-5-search-api, input_per_mtok: 1, output_per_mtok: 1,
         searches_every_request: never}
"""


def test_whether_a_deployment_searches_on_every_request_loads_and_dumps(tmp_path):
    """``searches_every_request``: left out, the upstream id decides (OpenAI's search models search on every
    request) and nothing is dumped; ``always`` and ``never`` are kept and dumped; any other value is refused."""
    load(write(tmp_path, SEARCHING))
    decided = {d.name: (d.searches_every_request, d.searches_on_every_request) for d in Deployment.objects.all()}
    assert decided == {"preview": ("", True), "sonar": ("always", True), "told-not": ("never", False)}
    dumped = {d["name"]: d for d in yaml.safe_load(dump())["models"][0]["deployments"]}
    assert "searches_every_request" not in dumped["preview"]
    assert (dumped["sonar"]["searches_every_request"], dumped["told-not"]["searches_every_request"]) == (
        "always",
        "never",
    )

    with pytest.raises(CommandError) as refused:
        load(write(tmp_path, SEARCHING.replace("searches_every_request: always", "searches_every_request: yes"), "b"))
    assert "searches_every_request" in str(refused.value) and "Nothing was written" in str(refused.value)


@pytest.mark.parametrize(
    ("kind", "base_url"),
    [
        ("anthropic", "http://127.0.0.1:9"),
        ("gemini", "http://127.0.0.1:9"),
        ("cohere", "http://127.0.0.1:9"),
        ("ollama", "http://127.0.0.1:9/v1"),
    ],
)
def test_a_deployment_not_on_openais_protocol_is_refused_searching_on_every_request(tmp_path, kind, base_url):
    """``searches_every_request: always`` on a provider whose adapter counts no such search (only OpenAI's protocol
    has search models) would reserve a search at admission that no request is charged: the file is refused naming
    the deployment, the field and the kind, and nothing is written; ``never`` loads."""
    text = f"""
    providers:
      - {{name: other, kind: {kind}, base_url: '{base_url}'}}
    models:
      - name: searching
        deployments:
          - {{provider: other, upstream: sonar-pro, input_per_mtok: 1, output_per_mtok: 1,
             searches_every_request: always}}
    """
    with pytest.raises(CommandError) as refused:
        load(write(tmp_path, text))
    message = str(refused.value)
    assert "deployment #1 (other)" in message and "searches_every_request" in message and f"kind {kind}" in message
    assert "Nothing was written" in message
    assert not Provider.objects.filter(name="other").exists()
    load(write(tmp_path, text.replace("searches_every_request: always", "searches_every_request: never"), "b"))
    assert Deployment.objects.get(model__name="searching").searches_every_request == "never"
