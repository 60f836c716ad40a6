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
from providers.models import Model, Provider
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
        parameter_rules: {fixed: {temperature: 1}, rename: {max_tokens: max_completion_tokens}}
  - name: claude
    kind: anthropic
    base_url: http://127.0.0.1:18081
    models:
      - name: claude-haiku
        upstream: claude-3-5-haiku-latest
        input_per_mtok: "0.8"
        output_per_mtok: "4"
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


def snapshot() -> tuple[list[dict], list[dict]]:
    providers = [
        {**row, "api_key": provider.api_key.reveal()}
        for provider, row in zip(
            Provider.objects.order_by("name"), Provider.objects.order_by("name").values(), strict=True
        )
    ]
    return providers, list(Model.objects.order_by("name").values())


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
    assert "model gpt-4o-mini: created" in output and "5 created, 0 updated, 0 unchanged." in output
    local = Provider.objects.get(name="local-openai")
    assert local.api_key.reveal() == UPSTREAM_KEY  # ${UPSTREAM_KEY} resolved from the environment
    assert local.extra_headers == {"X-Team": Secret("research")} and local.timeout_seconds == Decimal("60")
    mini = Model.objects.get(name="gpt-4o-mini")
    assert (mini.input_per_mtok, mini.output_per_mtok, mini.cached_input_per_mtok) == (
        Decimal("0.15"),
        Decimal("0.60"),
        Decimal("0.075"),
    )
    assert mini.max_output_tokens == 16384 and mini.provider == local
    o3 = Model.objects.get(name="o3-mini")
    assert o3.input_per_mtok == Decimal("1.1") and o3.output_per_mtok == Decimal("4.4")  # YAML floats, exactly
    assert o3.parameter_rules["fixed"] == {"temperature": 1} and o3.cached_input_per_mtok is None
    haiku = Model.objects.get(name="claude-haiku")
    assert haiku.supports_vision and haiku.supports_tools and haiku.provider.name == "claude"


def test_loading_twice_leaves_the_same_rows(catalog):
    load(catalog)
    first = snapshot()

    output = load(catalog)

    assert snapshot() == first  # same count, same values, not even updated_at moved
    assert "provider local-openai: unchanged (key kept)" in output
    assert "0 created, 0 updated, 5 unchanged." in output


def test_load_updates_changed_fields(catalog, tmp_path, monkeypatch):
    load(catalog)
    monkeypatch.setenv("UPSTREAM_KEY", "sk-rotated-upstream-key-99999999999")
    changed = CATALOG.replace('input_per_mtok: "0.15"', 'input_per_mtok: "0.20"').replace(
        "base_url: http://127.0.0.1:18081", "base_url: http://127.0.0.1:18082"
    )

    output = load(write(tmp_path, changed, "changed.yaml"))

    assert "provider local-openai: updated (key changed)" in output
    assert "model gpt-4o-mini: updated" in output and "model o3-mini: unchanged" in output
    assert "provider claude: updated (no key)" in output
    assert Model.objects.get(name="gpt-4o-mini").input_per_mtok == Decimal("0.20")
    assert Provider.objects.get(name="local-openai").api_key.reveal() == "sk-rotated-upstream-key-99999999999"
    assert Provider.objects.count() == 2 and Model.objects.count() == 3


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
    assert not Provider.objects.exists() and not Model.objects.exists()


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
    assert not Provider.objects.exists() and not Model.objects.exists()


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
    assert az["models"][0]["input_per_mtok"] == "2.5"

    # On another machine: an empty catalog and the variables the dump refers to.
    target = tmp_path / "dump.yaml"
    call_command("dumpproviders", "-o", str(target), stderr=io.StringIO())
    assert target.read_text() == text
    Model.objects.all().delete()
    Provider.objects.all().delete()
    monkeypatch.setenv("LOCAL_OPENAI_API_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("AZURE_EAST_HEADER_API_KEY", "azure-header-secret-123")
    load(target)

    def comparable(rows: list[dict]) -> list[dict]:
        return [
            {key: value for key, value in row.items() if key not in {"id", "provider_id", "created_at", "updated_at"}}
            for row in rows
        ]

    after = snapshot()
    assert comparable(after[0]) == comparable(before[0])
    assert comparable(after[1]) == comparable(before[1])


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
    assert dict(Model.objects.values_list("name", "mode")) == {"chatty": "chat", "embedder": "embedding"}

    out = io.StringIO()
    call_command("dumpproviders", stdout=out)
    dumped = {model["name"]: model for model in yaml.safe_load(out.getvalue())["providers"][0]["models"]}
    assert (dumped["chatty"]["mode"], dumped["embedder"]["mode"]) == ("chat", "embedding")
    Model.objects.all().delete()
    load(write(tmp_path, out.getvalue(), "dump.yaml"))
    assert dict(Model.objects.values_list("name", "mode")) == {"chatty": "chat", "embedder": "embedding"}

    output = load(write(tmp_path, EMBEDDING_CATALOG.replace("mode: embedding", "mode: chat"), "changed.yaml"))
    assert "model embedder: updated" in output and Model.objects.get(name="embedder").mode == "chat"

    with pytest.raises(CommandError) as refused:
        load(write(tmp_path, EMBEDDING_CATALOG.replace("mode: embedding", "mode: rerank"), "bad.yaml"))
    assert "model embedder: mode:" in str(refused.value) and "rerank" in str(refused.value)
    assert Model.objects.get(name="embedder").mode == "chat"  # nothing written


def test_dump_of_an_empty_catalog_loads_back():
    out = io.StringIO()
    call_command("dumpproviders", stdout=out)
    assert yaml.safe_load(out.getvalue()) == {"providers": []}


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
