"""Users' own provider keys in the admin: the Provider admin's ``byok`` and the ProviderCredential admin, driven
as a superuser through Django's test client."""

from __future__ import annotations

import base64
import json
import re

import pytest
from django.contrib import messages
from django.db import connection
from django.db.models import Model
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.models import AuditEvent
from providers.fields import Secret
from providers.models import ByokMode, CredentialStatus, Provider, ProviderCredential
from tests.admin_pages import changelist_page
from tests.factories import ProviderFactory, UserFactory, provider_admin_form

pytestmark = pytest.mark.django_db


# Provider.byok --------------------------------------------------------------------------------------


def test_the_provider_admin_edits_byok(admin_client):
    provider = ProviderFactory()
    url = reverse("admin:providers_provider_change", args=[provider.pk])

    page = admin_client.get(url).content.decode()
    assert 'name="byok"' in page and "Users&#x27; own keys" in page

    response = admin_client.post(url, provider_admin_form(provider, byok=ByokMode.REQUIRED))

    assert response.status_code == 302, response.content.decode()[:2000]
    provider.refresh_from_db()
    assert provider.byok == ByokMode.REQUIRED


def test_the_provider_admin_refuses_an_unknown_byok(admin_client):
    provider = ProviderFactory()

    response = admin_client.post(
        reverse("admin:providers_provider_change", args=[provider.pk]), provider_admin_form(provider, byok="sometimes")
    )

    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    provider.refresh_from_db()
    assert provider.byok == ByokMode.DISABLED


def test_the_provider_list_shows_and_filters_by_byok(admin_client):
    ProviderFactory(name="welcomes-own-keys", byok=ByokMode.OPTIONAL)
    ProviderFactory(name="platform-key-only")
    changelist = reverse("admin:providers_provider_changelist")

    page = admin_client.get(changelist).content.decode()
    assert "users&#x27; own keys" in page.lower() and ">optional</span>" in page

    filtered = admin_client.get(changelist, {"byok__exact": "optional"}).content.decode()
    assert "welcomes-own-keys" in filtered and "platform-key-only" not in filtered


# ProviderCredential -----------------------------------------------------------------------------------

ADA_KEY = "sk-ada-own-key-0123456789abcdefghijADAX"
GRACE_KEY = "sk-grace-own-key-9876543210zyxwvutsrGRCE"
CHANGELIST = "admin:providers_providercredential_changelist"


def credential(owner_name: str, provider: Provider, key: str, **fields: object) -> ProviderCredential:
    owner = UserFactory(username=owner_name)
    return ProviderCredential.objects.create(
        owner=owner, provider=provider, api_key=key, hint=Secret(key).hint, **fields
    )


@pytest.fixture
def keys(fake_upstream):
    """Two users' keys for a provider on the fake upstream (which accepts any key but one marked refused)."""
    provider = ProviderFactory(name="byo-openai", base_url=fake_upstream.base_url + "/v1", byok=ByokMode.OPTIONAL)
    other = ProviderFactory(name="byo-other", byok=ByokMode.REQUIRED)
    return (
        credential("ada", provider, ADA_KEY, label="personal account", status=CredentialStatus.VALID),
        credential("grace", other, GRACE_KEY, status=CredentialStatus.INVALID, status_detail="wrong key (HTTP 401)"),
    )


def test_the_list_shows_whose_key_for_which_provider_and_its_state_never_the_key(admin_client, keys):
    page = admin_client.get(reverse(CHANGELIST)).content.decode()

    for column in ("owner", "provider", "label", "hint", "status", "last validated at", "created at", "rotated at"):
        assert f">{column.capitalize()}</a>" in page or f">{column.capitalize()}</span>" in page, column
    assert "personal account" in page and Secret(ADA_KEY).hint in page and Secret(GRACE_KEY).hint in page
    assert '<span title="wrong key (HTTP 401)">Invalid</span>' in page
    for key in (ADA_KEY, GRACE_KEY):
        assert key not in page and key[3:-4] not in page


def test_the_list_filters_by_provider_and_status_and_searches_by_owner(admin_client, keys):
    ada, _ = keys
    changelist = reverse(CHANGELIST)

    def owners(**query: object) -> list[str]:
        response = admin_client.get(changelist, query)
        assert response.status_code == 200
        return sorted(row.owner.username for row in response.context["cl"].result_list)

    assert owners() == ["ada", "grace"]
    assert owners(provider__id__exact=ada.provider_id) == ["ada"]
    assert owners(status__exact="invalid") == ["grace"]
    assert owners(q="Grace") == ["grace"]  # whole, any case, through the users' indexes
    assert owners(q="grac") == []
    assert owners(q="ada@example.com") == ["ada"]


def test_the_change_page_is_read_only_and_never_holds_the_key(admin_client, keys):
    ada, _ = keys
    url = reverse("admin:providers_providercredential_change", args=[ada.pk])

    response = admin_client.get(url)

    page = response.content.decode()
    assert response.status_code == 200
    assert ADA_KEY not in page and ADA_KEY[3:-4] not in page
    # No field at all (a masked one neither): the only named inputs are the forms' CSRF tokens.
    assert set(re.findall(r'<(?:input|textarea|select)\b[^>]*\bname="([^"]+)"', page)) == {"csrfmiddlewaretoken"}
    assert Secret(ADA_KEY).hint in page and "personal account" in page
    assert 'name="_save"' not in page

    # Nor does a hand-made POST change anything, the key least of all.
    refused = admin_client.post(url, {"label": "renamed", "api_key": "sk-typed-by-staff-000000000000000"})
    assert refused.status_code == 403
    ada.refresh_from_db()
    assert ada.label == "personal account" and ada.api_key.reveal() == ADA_KEY


def test_staff_cannot_add_a_key(admin_client, keys):
    assert admin_client.get(reverse("admin:providers_providercredential_add")).status_code == 403
    assert (
        'href="/admin/providers/providercredential/add/"' not in admin_client.get(reverse(CHANGELIST)).content.decode()
    )


def run_action(client, action: str, *credentials: ProviderCredential) -> list[tuple[int, str]]:
    response = client.post(
        reverse(CHANGELIST), {"action": action, "_selected_action": [c.pk for c in credentials]}, follow=True
    )
    assert response.status_code == 200
    return [(message.level, message.message) for message in response.context["messages"]]


def delete_in_the_admin(client, one: Model, selected: Model) -> None:
    """Delete ``one`` on its delete page and ``selected`` by its list's bulk action, as staff would."""
    admin = f"admin:{one._meta.app_label}_{one._meta.model_name}"
    assert client.post(reverse(f"{admin}_delete", args=[one.pk]), {"post": "yes"}).status_code == 302
    several = {"action": "delete_selected", "_selected_action": [selected.pk], "post": "yes"}
    assert client.post(reverse(f"{admin}_changelist"), several).status_code == 302


def assert_recorded_deleted(*credentials: ProviderCredential) -> None:
    """Each of ``credentials``, and no other key, recorded as one ``provider_key.delete`` in the admin's name, in
    that order: its hint, never the key."""
    events = AuditEvent.objects.filter(action="provider_key.delete").order_by("seq")
    assert [(event.target_id, event.target_repr, event.actor_repr, event.changes["hint"]) for event in events] == [
        (str(credential.pk), str(credential), "admin", [credential.hint, None]) for credential in credentials
    ]
    assert not any(key in str(event.changes) for event in events for key in (ADA_KEY, GRACE_KEY))


def test_checking_keys_again_marks_them_with_what_the_provider_says(admin_client, keys, fake_upstream):
    ada, _ = keys
    refused = credential("linus", ada.provider, "sk-linus-key-refused-00000000000000LNUS")

    shown = run_action(admin_client, "revalidate", ada, refused)

    ada.refresh_from_db()
    refused.refresh_from_db()
    assert ada.status == CredentialStatus.VALID and ada.last_validated_at is not None
    assert refused.status == CredentialStatus.INVALID and "not a valid API key" in refused.status_detail
    assert (messages.SUCCESS, f"{ada}: valid.") in shown
    assert (messages.ERROR, f"{refused}: refused: {refused.status_detail}") in shown
    failed = AuditEvent.objects.get(action="provider_key.validation_failed")
    assert failed.target_id == str(refused.pk) and failed.actor_repr == "admin"
    # The provider was asked with each user's own key.
    assert len({entry["key_sha256"] for entry in fake_upstream.requests}) == 2


def test_a_provider_that_cannot_be_asked_leaves_the_status_as_it_was(admin_client, keys):
    _, grace = keys  # its provider points at a port where nothing listens

    shown = run_action(admin_client, "revalidate", grace)

    grace.refresh_from_db()
    assert grace.status == CredentialStatus.INVALID and grace.status_detail == "wrong key (HTTP 401)"
    [(level, text)] = shown
    assert level == messages.WARNING and text.startswith(f"{grace}: not checked:")
    assert GRACE_KEY not in text


def test_staff_delete_keys_through_the_service_which_records_it(admin_client, keys):
    ada, grace = keys

    confirm = admin_client.get(reverse("admin:providers_providercredential_delete", args=[ada.pk]))
    assert confirm.status_code == 200 and ADA_KEY not in confirm.content.decode()
    delete_in_the_admin(admin_client, ada, grace)

    assert not ProviderCredential.objects.exists()
    assert_recorded_deleted(ada, grace)


def test_checking_many_keys_again_is_queued_for_a_worker_and_said_so(admin_client, fake_upstream, broker_queue):
    """Hundreds of keys selected: the request asked each provider in turn, a live call a key (each up to its
    timeout), past any request's. Past a few keys the check is queued for a worker, which checks them as the daily
    run does (a few at a time, each provider its share), records each outcome as the action did, in the admin's
    name, and the request asks no provider and costs the same queries for 11 keys as for 60."""
    from providers.tasks_credentials import provider_credentials_revalidate_selected

    provider = ProviderFactory(name="byo-openai", base_url=fake_upstream.base_url + "/v1", byok=ByokMode.OPTIONAL)

    def keys(start: int, count: int) -> list[ProviderCredential]:
        made = [
            credential(f"u{start + n}", provider, f"sk-own-key-{start + n:06d}-0123456789abcdefXYZW")
            for n in range(count)
        ]
        return made

    def check(selected: list[ProviderCredential]) -> tuple[int, list[tuple[int, str]]]:
        with CaptureQueriesContext(connection) as queries:
            shown = run_action(admin_client, "revalidate", *selected)
        return len(queries), shown

    check(keys(0, 11))  # the first fills Django's caches: not counted
    few, _ = check(keys(100, 11))
    refused = credential("linus", provider, "sk-linus-key-refused-00000000000000LNUS")
    selected = [*keys(1_000, 59), refused]
    many, shown = check(selected)

    assert many == few
    assert shown == [
        (
            messages.SUCCESS,
            "Queued: a worker checks the 60 selected keys again with their providers, 8 at a time; refresh this "
            "page to see each one's status as it is checked.",
        )
    ]
    assert not fake_upstream.requests and broker_queue.llen("celery") == 3
    assert set(ProviderCredential.objects.values_list("status", flat=True)) == {CredentialStatus.UNCHECKED}

    # What the worker runs, with the task's arguments as queued.
    body = json.loads(broker_queue.lindex("celery", 0))
    headers, args = body["headers"], json.loads(base64.b64decode(body["body"]))[0]
    assert headers["task"] == "providers.tasks_credentials.provider_credentials_revalidate_selected"
    counts = provider_credentials_revalidate_selected(*args)
    assert counts == {"valid": 59, "invalid": 1, "turned_invalid": 1, "unchecked": 0, "left": 0}
    refused.refresh_from_db()
    assert refused.status == CredentialStatus.INVALID and "not a valid API key" in refused.status_detail
    failed = AuditEvent.objects.get(action="provider_key.validation_failed")
    assert failed.target_id == str(refused.pk) and failed.actor_repr == "admin"


def test_a_check_of_many_keys_the_broker_cannot_take_is_said_so(admin_client, fake_upstream, broker):
    provider = ProviderFactory(name="byo-openai", base_url=fake_upstream.base_url + "/v1", byok=ByokMode.OPTIONAL)
    selected = [credential(f"u{n}", provider, f"sk-own-key-{n:06d}-0123456789abcdefXYZW") for n in range(11)]
    broker.down()

    shown = run_action(admin_client, "revalidate", *selected)

    assert shown == [
        (
            messages.ERROR,
            "The check of the 11 selected keys could not be queued (the task broker did not answer: "
            "OperationalError); nothing was checked. Try again once it answers.",
        )
    ]
    assert not fake_upstream.requests


def test_the_keys_list_reads_the_page_and_one_count_however_many_keys(admin_client, keys):
    """A key a user and provider: each view counted every key twice, read every one for the provider filter's
    choices (SELECT DISTINCT) and the date hierarchy's years, and sorted them all by owner and the joined provider's
    name. It reads the page's keys, newest first off the primary key, and one count; the filters read the
    providers, and the date filter nothing."""
    ada, grace = keys
    changelist = reverse(CHANGELIST)

    def view() -> tuple[list[str], list[ProviderCredential]]:
        page = changelist_page(admin_client, changelist, "providers_providercredential")
        return page.reads, page.rows

    view()  # the first fills Django's caches: not counted
    few, _ = view()
    provider = ada.provider
    for n in range(30):
        credential(f"many{n}", provider, f"sk-own-key-{n:06d}-0123456789abcdefXYZW")
    many, shown = view()

    assert len(many) == len(few) == 2, many  # the page's keys and their one count
    assert not any("DISTINCT" in sql or '"providers_provider"."name"' in sql.partition("ORDER BY")[2] for sql in many)
    assert shown[0].owner.username == "many29" and shown[-1] == ada  # newest first
    assert [
        row.owner.username
        for row in admin_client.get(changelist, {"provider__id__exact": grace.provider_id}).context["cl"].result_list
    ] == ["grace"]


def test_deleting_providers_records_each_users_key_it_takes_with_it(admin_client, keys):
    """A provider's delete cascades to its users' own keys: each is recorded as ``provider_key.delete``, as a key
    deleted alone is, whether one provider goes (its delete page) or several (the bulk action)."""
    ada, grace = keys
    more = credential("linus", ada.provider, "sk-linus-own-key-000000000000000000LNUS")
    kept = credential("margaret", ProviderFactory(name="byo-kept"), "sk-margaret-key-00000000000000000MRGT")

    delete_in_the_admin(admin_client, ada.provider, grace.provider)

    assert list(ProviderCredential.objects.all()) == [kept]
    assert_recorded_deleted(ada, more, grace)
    assert AuditEvent.objects.filter(action="providers.provider.delete").count() == 2


def test_deleting_users_records_each_of_their_own_keys_it_takes_with_it(admin_client, keys):
    """A user's delete cascades to their own provider keys: each went with no event, while a key deleted alone, or
    with its provider, is recorded as ``provider_key.delete``. Each is now recorded so (its hint, never the key),
    whether one user goes (their delete page) or several (the bulk action); another user's key stays unrecorded."""
    ada, grace = keys
    second = ProviderCredential.objects.create(
        owner=ada.owner, provider=grace.provider, api_key=GRACE_KEY, hint=Secret(GRACE_KEY).hint
    )
    kept = credential("margaret", ada.provider, "sk-margaret-key-00000000000000000MRGT")

    delete_in_the_admin(admin_client, ada.owner, grace.owner)

    assert list(ProviderCredential.objects.all()) == [kept]
    assert_recorded_deleted(ada, second, grace)
