"""``byok`` (bring your own key) per provider in the catalog file: loaded, dumped, round-tripped, checked."""

from __future__ import annotations

import io
import logging
import textwrap
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from audit.models import AuditEvent
from providers.models import ByokMode, Provider, ProviderCredential
from providers.services.credentials import provider_credential_host_confirm, provider_host_change_record
from providers.tasks_credentials import provider_credential_host_moved_email
from tests.factories import ProviderFactory, UserFactory
from tests.mail import MailRefusingSome, MailWhileSending

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


MOVED = """
providers:
  - name: own-keys-welcome
    kind: openai
    base_url: {base_url}
    byok: optional
"""


def test_a_file_moving_a_provider_tells_its_keys_owners_once_and_audits_it_once(
    tmp_path, mailoutbox, django_capture_on_commit_callbacks
):
    load(write(tmp_path, MOVED.format(base_url="http://127.0.0.1:18080/v1")))
    provider = Provider.objects.get(name="own-keys-welcome")
    for name in ("alice", "bob"):
        ProviderCredential.objects.create(
            owner=UserFactory(username=name, email=f"{name}@example.com"),
            provider=provider,
            api_key=f"sk-{name}-own-key-0000000000",
            hint="sk-…0000",
        )
    moved = write(tmp_path, MOVED.format(base_url="http://127.0.0.1:18090/v1"), "moved.yaml")

    with django_capture_on_commit_callbacks(execute=True):
        out = load(moved)
    with django_capture_on_commit_callbacks(execute=True):
        load(moved)  # loaded again: nothing moves, nobody is told again

    assert "2 user(s)' own key(s) paused" in out
    assert sorted(m.to[0] for m in mailoutbox) == ["alice@example.com", "bob@example.com"]
    assert "is paused" in mailoutbox[0].subject and "http://127.0.0.1:18090" in mailoutbox[0].body
    [event] = AuditEvent.objects.filter(action="provider.host_change")
    assert event.changes["host"] == ["http://127.0.0.1:18080", "http://127.0.0.1:18090"]
    assert event.changes["keys_paused"] == [None, 2]


def test_a_file_refused_after_moving_a_provider_tells_nobody(tmp_path, mailoutbox, django_capture_on_commit_callbacks):
    load(write(tmp_path, MOVED.format(base_url="http://127.0.0.1:18080/v1")))
    provider = Provider.objects.get(name="own-keys-welcome")
    ProviderCredential.objects.create(
        owner=UserFactory(email="alice@example.com"), provider=provider, api_key="sk-alice-own-key-000", hint="sk-…0000"
    )
    refused = MOVED.format(base_url="http://127.0.0.1:18090/v1") + "models:\n  - name: broken\n"

    with django_capture_on_commit_callbacks(execute=True), pytest.raises(CommandError):
        load(write(tmp_path, refused, "refused.yaml"))

    assert mailoutbox == [] and not AuditEvent.objects.filter(action="provider.host_change").exists()
    assert Provider.objects.get(name="own-keys-welcome").origin == "http://127.0.0.1:18080"


def test_an_owner_is_told_of_a_move_once_even_when_the_mail_server_fails_once(
    tmp_path, mailoutbox, mail_fails_once, django_capture_on_commit_callbacks
):
    """The notice goes out from a Celery task per key, retried while the mail server fails: it was sent from
    the move's own transaction hook, and an SMTP failure lost it (logged only)."""
    load(write(tmp_path, MOVED.format(base_url="http://127.0.0.1:18080/v1")))
    ProviderCredential.objects.create(
        owner=UserFactory(email="alice@example.com"),
        provider=Provider.objects.get(name="own-keys-welcome"),
        api_key="sk-alice-own-key-000",
        hint="sk-…0000",
    )

    with django_capture_on_commit_callbacks(execute=True):
        load(write(tmp_path, MOVED.format(base_url="http://127.0.0.1:18090/v1"), "moved.yaml"))

    assert [m.to for m in mailoutbox] == [["alice@example.com"]]


def test_a_notice_for_a_key_confirmed_or_deleted_before_it_went_out_is_not_sent(db, mailoutbox):
    provider = ProviderFactory(name="moving", base_url="http://127.0.0.1:18080/v1", byok=ByokMode.OPTIONAL)
    confirmed, deleted = (
        ProviderCredential.objects.create(
            owner=UserFactory(email=f"{name}@example.com"), provider=provider, api_key=f"sk-{name}-key-0", hint="x"
        )
        for name in ("carol", "dave")
    )
    provider.base_url = "http://127.0.0.1:18090/v1"
    provider.save()
    provider_credential_host_confirm(credential=confirmed)
    deleted.delete()

    for credential in (confirmed, deleted):
        provider_credential_host_moved_email.delay(credential.pk, "http://127.0.0.1:18080", "http://127.0.0.1:18090")

    assert mailoutbox == []


def test_a_moves_emails_run_again_after_a_mail_failure_tell_only_the_owners_not_told_each_once(
    mailoutbox, settings, django_capture_on_commit_callbacks
):
    """A move tells each owner whose key it paused once, whatever runs its emails again. The mail server refused the
    second of three owners through every retry of their email; the move's message run again (the broker delivering
    it again, a retry of its fan-out) then emailed the first and the third a second time, as nothing recorded who
    had been told."""
    settings.EMAIL_BACKEND = f"{MailRefusingSome.__module__}.MailRefusingSome"
    MailRefusingSome.refused, MailRefusingSome.refusals = frozenset({"bob@example.com"}), 0
    provider = ProviderFactory(name="moving", base_url="http://127.0.0.1:18080/v1", byok=ByokMode.OPTIONAL)
    for name in ("alice", "bob", "carol"):
        ProviderCredential.objects.create(
            owner=UserFactory(username=name, email=f"{name}@example.com"),
            provider=provider,
            api_key=f"sk-{name}-key-0",
            hint="x",
        )
    provider.base_url = "http://127.0.0.1:18090/v1"
    provider.save()
    with django_capture_on_commit_callbacks() as after_the_move:
        provider_host_change_record(provider=provider, old_origin="http://127.0.0.1:18080")

    for callback in after_the_move:
        callback()

    assert [m.to for m in mailoutbox] == [["alice@example.com"], ["carol@example.com"]]
    assert MailRefusingSome.refusals == 9  # the first attempt and its 8 retries

    MailRefusingSome.refused = frozenset()  # the mail server is back
    for _ in range(2):
        for callback in after_the_move:
            callback()

    assert sorted(m.to[0] for m in mailoutbox) == ["alice@example.com", "bob@example.com", "carol@example.com"]
    assert "is paused" in mailoutbox[2].subject and "http://127.0.0.1:18090" in mailoutbox[2].body


class _OnFirstRecord(logging.Handler):
    """Runs ``then`` at the first record logged through it (a broker back once the refusal was logged)."""

    def __init__(self, then) -> None:
        super().__init__(logging.WARNING)
        self.then = then

    def emit(self, record: logging.LogRecord) -> None:
        then, self.then = self.then, None
        if then is not None:
            then()


def test_a_broker_refusing_a_moves_emails_partway_has_the_rest_sent_by_the_retry_each_owner_once(
    mailoutbox, settings, broker, django_capture_on_commit_callbacks
):
    """The broker went away while the move's emails were being queued (after the first owner's was sent): the
    fan-out task failed there, and the second and third owners were never told. It is retried for the keys not
    queued, and the first owner is not told twice."""
    settings.EMAIL_BACKEND = f"{MailWhileSending.__module__}.MailWhileSending"
    MailWhileSending.during = broker.down  # as the first email goes out
    back = _OnFirstRecord(broker.up)  # the broker answers again once the refused queueing was logged
    logging.getLogger("providers.tasks_credentials").addHandler(back)
    provider = ProviderFactory(name="moving", base_url="http://127.0.0.1:18080/v1", byok=ByokMode.OPTIONAL)
    for name in ("alice", "bob", "carol"):
        ProviderCredential.objects.create(
            owner=UserFactory(username=name, email=f"{name}@example.com"),
            provider=provider,
            api_key=f"sk-{name}-key-0",
            hint="x",
        )
    provider.base_url = "http://127.0.0.1:18090/v1"
    provider.save()
    try:
        with django_capture_on_commit_callbacks(execute=True):
            provider_host_change_record(provider=provider, old_origin="http://127.0.0.1:18080")
    finally:
        logging.getLogger("providers.tasks_credentials").removeHandler(back)

    assert [m.to[0] for m in mailoutbox] == ["alice@example.com", "bob@example.com", "carol@example.com"]
    assert back.then is None, "the broker never refused a queueing"
