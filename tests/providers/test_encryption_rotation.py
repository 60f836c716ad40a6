"""Encryption-key rotation in batches, each committed with its progress: a run killed midway (an exception
after some batches) leaves every row either moved to the new key or not, and the next run finishes the job
from the last committed batch without touching the rows already done; a new first key starts over, the same
key skips finished columns; a value no key decrypts stops its batch and is shown as the column's last error;
the admin shows rows done of total per column. Covers every encrypted column: a provider's key and extra
headers, and users' own provider keys."""

from __future__ import annotations

import re

import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import Client, override_settings
from django.urls import reverse

from providers.fields import TOKEN_PREFIX
from providers.models import EncryptionRotation, Provider, ProviderCredential
from providers.services.encryption import encryption_key_id, provider_rotate_encryption
from providers.tasks import providers_rotate_encryption_task
from tests.factories import ProviderFactory, UserFactory

pytestmark = pytest.mark.django_db

OLD, NEW, NEWER = (Fernet.generate_key().decode() for _ in range(3))
PROVIDER_KEYS = {f"p{n}": f"sk-provider-{n}-0123456789abcdefghijklmnop" for n in range(7)}
USER_KEYS = {f"u{n}": f"sk-user-{n}-0123456789abcdefghijklmnopqrstu" for n in range(3)}
COLUMNS = ["providers.Provider.api_key", "providers.Provider.extra_headers", "providers.ProviderCredential.api_key"]


class Crash(Exception):
    """Stands for the worker dying midway."""


def crash_after(batches: int):
    seen = []

    def after_batch(progress: EncryptionRotation) -> None:
        seen.append(progress.column)
        if len(seen) == batches:
            raise Crash

    return after_batch


def raw_tokens(table: str, column: str) -> dict[int, str]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id, {column} FROM {table} ORDER BY id")
        return dict(cursor.fetchall())


def all_tokens() -> dict[str, dict[int, str]]:
    return {
        "providers.Provider.api_key": raw_tokens("providers_provider", "api_key"),
        "providers.Provider.extra_headers": raw_tokens("providers_provider", "extra_headers"),
        "providers.ProviderCredential.api_key": raw_tokens("providers_providercredential", "api_key"),
    }


def under(key: str, token: str) -> bool:
    try:
        Fernet(key.encode()).decrypt(token[len(TOKEN_PREFIX) :].encode())
    except InvalidToken:
        return False
    return True


def progress(column: str) -> EncryptionRotation:
    return EncryptionRotation.objects.get(column=column)


@pytest.fixture
def secrets_under_old_key():
    """7 providers (one keyless, two with an extra header) and 3 users' own keys, written under OLD."""
    with override_settings(FIELD_ENCRYPTION_KEYS=[OLD]):
        providers = [
            ProviderFactory(
                name=name,
                api_key="" if name == "p3" else key,
                extra_headers={"X-Upstream-Token": f"header-{name}-secret"} if name in ("p1", "p5") else {},
            )
            for name, key in PROVIDER_KEYS.items()
        ]
        for (name, key), provider in zip(USER_KEYS.items(), providers, strict=False):
            ProviderCredential.objects.create(owner=UserFactory(username=name), provider=provider, api_key=key)
    return providers


def assert_every_value_reads_under(key: str) -> None:
    with override_settings(FIELD_ENCRYPTION_KEYS=[key]):
        for provider in Provider.objects.filter(name__in=PROVIDER_KEYS):
            assert provider.api_key.reveal() == ("" if provider.name == "p3" else PROVIDER_KEYS[provider.name])
            if provider.name in ("p1", "p5"):
                assert provider.extra_headers["X-Upstream-Token"].reveal() == f"header-{provider.name}-secret"
        for credential in ProviderCredential.objects.select_related("owner"):
            assert credential.api_key.reveal() == USER_KEYS[credential.owner.username]


def test_a_run_killed_midway_is_resumed_and_finishes_without_redoing_the_batches_done(secrets_under_old_key):
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD]):
        with pytest.raises(Crash):
            provider_rotate_encryption(batch_size=2, after_batch=crash_after(2))
        killed = all_tokens()

        # Two batches of two providers' keys were committed with their progress; nothing else moved.
        first = progress("providers.Provider.api_key")
        provider_ids = sorted(killed["providers.Provider.api_key"])
        assert (first.rows_done, first.rows_total, first.last_pk) == (4, 7, str(provider_ids[3]))
        assert first.finished_at is None and first.runs == 1 and first.last_error.startswith("Crash")
        done = {pk: token for pk, token in killed["providers.Provider.api_key"].items() if pk in provider_ids[:4]}
        assert all(under(NEW, token) for token in done.values() if token)
        rest = {pk: token for pk, token in killed["providers.Provider.api_key"].items() if pk not in done}
        assert all(under(OLD, token) and not under(NEW, token) for token in rest.values() if token)
        assert all(under(OLD, token) for token in killed["providers.ProviderCredential.api_key"].values())
        assert EncryptionRotation.objects.count() == 1  # the later columns were not started

        rewritten = provider_rotate_encryption(batch_size=2)
        new_key_id = encryption_key_id()

    after = all_tokens()
    # The resumed run started after the last committed batch: the rows done before are untouched.
    assert {pk: after["providers.Provider.api_key"][pk] for pk in done} == done
    assert rewritten == (6 - 3) + 2 + 3  # the rest of the keys (p3 is keyless), 2 headers, 3 users' keys
    for column in COLUMNS:
        row = progress(column)
        assert row.finished_at is not None and row.last_error == "" and row.key_id == new_key_id
        assert row.rows_done == row.rows_total == len(after[column])
        assert all(under(NEW, token) for token in after[column].values() if token)
    assert progress("providers.Provider.api_key").runs == 2
    assert progress("providers.ProviderCredential.api_key").runs == 1
    assert_every_value_reads_under(NEW)


def test_the_same_key_skips_finished_columns_and_a_new_key_starts_over(secrets_under_old_key):
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD]):
        assert provider_rotate_encryption(batch_size=3) == 6 + 2 + 3
        once = all_tokens()
        assert provider_rotate_encryption(batch_size=3) == 0
        assert all_tokens() == once

    with override_settings(FIELD_ENCRYPTION_KEYS=[NEWER, NEW]):
        assert provider_rotate_encryption() == 6 + 2 + 3
        assert all(progress(column).runs == 1 for column in COLUMNS)
        assert provider_rotate_encryption(restart=True) == 6 + 2 + 3  # forced: every column again
    assert_every_value_reads_under(NEWER)


def test_rows_added_after_a_crash_are_counted_and_read_under_the_new_key(secrets_under_old_key):
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD]):
        with pytest.raises(Crash):
            provider_rotate_encryption(batch_size=2, after_batch=crash_after(1))
        ProviderFactory(name="late", api_key="sk-late-0123456789abcdefghijklmnop")  # written under NEW

        provider_rotate_encryption(batch_size=2)

    row = progress("providers.Provider.api_key")
    assert row.rows_done == row.rows_total == 8
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW]):
        assert Provider.objects.get(name="late").api_key.reveal() == "sk-late-0123456789abcdefghijklmnop"


def test_a_value_no_key_decrypts_stops_its_batch_and_the_run_resumes_once_the_key_is_back(secrets_under_old_key):
    lost = Fernet.generate_key().decode()
    with override_settings(FIELD_ENCRYPTION_KEYS=[lost]):
        stray = ProviderFactory(name="z-stray", api_key="sk-under-a-key-nobody-has-0123456789")
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD]):
        before = all_tokens()["providers.Provider.api_key"]
        with pytest.raises(ImproperlyConfigured) as excinfo:
            provider_rotate_encryption(batch_size=3)

        assert f"row {stray.pk}" in str(excinfo.value)
        row = progress("providers.Provider.api_key")
        assert row.rows_done == 6 and row.finished_at is None and f"row {stray.pk}" in row.last_error
        stopped = all_tokens()["providers.Provider.api_key"]
        last_batch = sorted(stopped)[6:]  # p6 and the stray row: the batch that failed, rolled back whole
        assert {pk: stopped[pk] for pk in last_batch} == {pk: before[pk] for pk in last_batch}

    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD, lost]):
        assert provider_rotate_encryption(batch_size=3) == 2 + 2 + 3
        assert progress("providers.Provider.api_key").last_error == ""
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW]):
        assert Provider.objects.get(pk=stray.pk).api_key.reveal() == "sk-under-a-key-nobody-has-0123456789"
    assert_every_value_reads_under(NEW)


def test_the_task_resumes_a_killed_run(secrets_under_old_key):
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD], LLMHUB_ENCRYPTION_ROTATION_BATCH_SIZE=2):
        with pytest.raises(Crash):
            provider_rotate_encryption(after_batch=crash_after(1))

        assert providers_rotate_encryption_task.delay().get() == (6 - 2) + 2 + 3
    assert_every_value_reads_under(NEW)


def test_the_admin_shows_progress_per_column_and_allows_no_edits(secrets_under_old_key):
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-for-tests-123"))
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD]):
        with pytest.raises(Crash):
            provider_rotate_encryption(batch_size=2, after_batch=crash_after(2))
        page = client.get(reverse("admin:providers_encryptionrotation_changelist"))

    assert page.status_code == 200
    content = page.content.decode()
    assert "providers.Provider.api_key" in content and "4 / 7 (57%)" in content
    assert "stopped" in content and "Crash" in content
    assert client.get(reverse("admin:providers_encryptionrotation_add")).status_code == 403
    row = progress("providers.Provider.api_key")
    change = client.post(reverse("admin:providers_encryptionrotation_change", args=[row.pk]), {"last_pk": ""})
    assert change.status_code == 403
    assert progress("providers.Provider.api_key").last_pk == row.last_pk
    for secret in [*PROVIDER_KEYS.values(), *USER_KEYS.values(), OLD, NEW]:
        assert secret not in content

    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD]):
        queued = client.post(
            reverse("admin:providers_encryptionrotation_changelist"),
            {"action": "run_now", "_selected_action": [row.pk]},
            follow=True,
        )
    assert queued.status_code == 200
    assert "finished" in client.get(reverse("admin:providers_encryptionrotation_changelist")).content.decode()
    assert all(progress(column).finished_at is not None for column in COLUMNS)


def test_a_run_under_an_older_key_stops_a_column_a_run_under_a_newer_key_took_over(secrets_under_old_key):
    """A rolling restart after a new key was put first: a worker still on the old settings is rotating (to NEW)
    when one on the new settings starts the column over (to NEWER). The old run went on under the progress
    row the new one had relabelled: the rows it moved were counted done for NEWER while under NEW, the column
    showed finished, and the next run under NEWER skipped it. Dropping NEW, as the admin then allowed, lost
    those providers' keys. The old run now stops the column, and the next run moves every row to NEWER."""
    takeover = []

    def newer_worker_meanwhile(progress: EncryptionRotation) -> None:
        if not takeover:  # after the old run's first batch, a new worker does one batch, then is stopped
            takeover.append(progress.column)
            with override_settings(FIELD_ENCRYPTION_KEYS=[NEWER, NEW, OLD]), pytest.raises(Crash):
                provider_rotate_encryption(batch_size=2, after_batch=crash_after(1))

    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD]):
        provider_rotate_encryption(batch_size=2, after_batch=newer_worker_meanwhile)
    assert takeover == ["providers.Provider.api_key"]

    with override_settings(FIELD_ENCRYPTION_KEYS=[NEWER, NEW, OLD]):
        provider_rotate_encryption(batch_size=2)  # the next run, on the new settings only
        newer_key_id = encryption_key_id()
    for column in COLUMNS:
        row = progress(column)
        assert row.finished_at is not None and row.key_id == newer_key_id
    assert_every_value_reads_under(NEWER)


def test_after_a_new_first_key_the_admin_shows_no_column_finished_until_it_is_moved_to_it(secrets_under_old_key):
    """Step 1 of a rotation puts a new key first; until the task has run, every column still said "finished"
    (its rotation to the key before), and the documented rule is to drop the old key once every column shows
    finished: doing so then lost every stored secret. A column's state is "finished" only for the current
    first key."""
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-for-tests-123"))
    url = reverse("admin:providers_encryptionrotation_changelist")

    def states() -> list[str]:
        content = client.get(url).content.decode()
        return re.findall(r'<td class="field-state">([^<]*)</td>', content)

    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW, OLD]):
        provider_rotate_encryption()
        columns = EncryptionRotation.objects.count()
        assert columns >= len(COLUMNS) and states() == ["finished"] * columns

    with override_settings(FIELD_ENCRYPTION_KEYS=[NEWER, NEW]):  # restarted with a new first key, not run yet
        assert states() == ["to do: FIELD_ENCRYPTION_KEYS has a new first key"] * columns
        provider_rotate_encryption()
        assert states() == ["finished"] * columns
    assert_every_value_reads_under(NEWER)
