"""``byok`` (bring your own key) per provider in the catalog file: loaded, dumped, round-tripped, checked."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from providers.models import ByokMode, Provider
from tests.factories import ProviderFactory

pytestmark = pytest.mark.django_db

CATALOG = """
providers:
  - name: own-keys-welcome
    kind: openai
    base_url: http://127.0.0.1:18080/v1
    byok: optional
  - name: own-keys-only
    kind: anthropic
    base_url: http://127.0.0.1:18081
    byok: required
  - name: platform-only
    kind: openai_compatible
    base_url: http://127.0.0.1:18082/v1
"""


def write(tmp_path: Path, text: str, name: str = "providers.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(path: Path) -> str:
    out = io.StringIO()
    call_command("loadproviders", str(path), stdout=out)
    return out.getvalue()


def dump() -> str:
    out = io.StringIO()
    call_command("dumpproviders", stdout=out)
    return out.getvalue()


def byok_by_name() -> dict[str, str]:
    return dict(Provider.objects.values_list("name", "byok"))


def test_load_reads_byok_and_defaults_to_disabled(tmp_path):
    load(write(tmp_path, CATALOG))

    assert byok_by_name() == {
        "own-keys-welcome": ByokMode.OPTIONAL,
        "own-keys-only": ByokMode.REQUIRED,
        "platform-only": ByokMode.DISABLED,
    }


def test_dump_writes_byok_and_the_file_round_trips(tmp_path):
    load(write(tmp_path, CATALOG))
    first = dump()
    dumped = {entry["name"]: entry["byok"] for entry in yaml.safe_load(first)["providers"]}
    assert dumped == {"own-keys-welcome": "optional", "own-keys-only": "required", "platform-only": "disabled"}

    Provider.objects.all().delete()
    load(write(tmp_path, first, "dump.yaml"))

    assert byok_by_name() == dumped
    assert dump() == first


def test_a_changed_byok_updates_the_provider_and_loading_again_changes_nothing(tmp_path):
    load(write(tmp_path, CATALOG))
    changed = write(tmp_path, CATALOG.replace("byok: optional", "byok: required"), "changed.yaml")

    assert "provider own-keys-welcome: updated" in load(changed)
    assert Provider.objects.get(name="own-keys-welcome").byok == ByokMode.REQUIRED
    assert "provider own-keys-welcome: unchanged" in load(changed)


def test_an_admins_byok_is_put_back_by_a_file_that_leaves_it_out(tmp_path):
    ProviderFactory(name="platform-only", kind="openai_compatible", byok=ByokMode.OPTIONAL)

    assert "provider platform-only: updated" in load(write(tmp_path, CATALOG))
    assert Provider.objects.get(name="platform-only").byok == ByokMode.DISABLED


@pytest.mark.parametrize("value", ["sometimes", "Optional", "true", "1", "[optional]"])
def test_an_invalid_byok_names_the_provider_and_writes_nothing(tmp_path, value):
    broken = write(tmp_path, CATALOG.replace("byok: required", f"byok: {value}"))

    with pytest.raises(CommandError) as raised:
        load(broken)

    message = str(raised.value)
    assert "provider own-keys-only" in message
    assert "byok must be one of disabled, optional, required" in message
    assert "Nothing was written" in message
    assert not Provider.objects.exists()
