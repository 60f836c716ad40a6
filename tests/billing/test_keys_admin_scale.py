"""The keys' admin actions at scale: revoking or deleting the keys selected across the list costs a few queries a
batch of keys, not a few a key, and still records one audit event a key (docs/ledger.md, "The admin at scale")."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.models import AuditEvent
from audit.services import audit_verify
from billing.models import ApiKey
from billing.services.keys import MAX_KEY_DEPTH
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def keys_in_bulk(count: int, *, start: int) -> list[ApiKey]:
    """``count`` keys of one user, each with a key created under it."""
    owner = UserFactory(username=f"owner{start}")
    tops = ApiKey.objects.bulk_create(
        ApiKey(user=owner, name=f"k{start + n}", prefix=f"p{start + n}", secret_hash=f"h{start + n}")
        for n in range(count)
    )
    ApiKey.objects.bulk_create(
        ApiKey(user=owner, parent=top, name=f"c{top.pk}", prefix=f"c{top.pk}", secret_hash=f"c{top.pk}") for top in tops
    )
    return tops


def run_action(admin_client, action: str, keys: list[ApiKey]) -> CaptureQueriesContext:
    form = {"action": action, "_selected_action": [key.pk for key in keys]}
    if action == "delete_selected":
        form["post"] = "yes"
    with CaptureQueriesContext(connection) as queries:
        answer = admin_client.post(reverse("admin:billing_apikey_changelist"), form)
    assert answer.status_code == 302
    return queries


@pytest.mark.parametrize(("action", "event"), [("revoke_selected", "key.revoke"), ("delete_selected", "key.delete")])
def test_a_keys_action_costs_a_few_queries_a_batch_of_keys_not_a_key(admin_client, action, event):
    first, few, many = keys_in_bulk(1, start=5_000), keys_in_bulk(10, start=0), keys_in_bulk(200, start=1_000)
    run_action(admin_client, action, first)  # the first fills Django's caches: not counted

    on_few = run_action(admin_client, action, few)
    on_many = run_action(admin_client, action, many)

    # More only by statements of batches (the events', the deletes'): fewer than a query for every ten keys more;
    # it was a dozen queries a key.
    assert len(on_few) <= len(on_many) < len(on_few) + (len(many) - len(few)) // 10
    taken = ApiKey.objects.filter(user__username__in=["owner0", "owner1000", "owner5000"])
    if action == "revoke_selected":  # the keys selected, not those under them (they stop with them)
        assert taken.filter(revoked_at__isnull=False).count() == 211 and taken.count() == 422
    else:
        assert not taken.exists()
    targets = AuditEvent.objects.filter(action=event).values_list("target_id", flat=True)
    assert sorted(map(int, targets)) == sorted(key.pk for key in [*first, *few, *many])
    assert audit_verify() is None


def test_the_delete_page_of_a_key_counts_the_keys_below_it_to_the_deepest(admin_client):
    """A person's key with 8 levels of keys below it (MAX_KEY_DEPTH), 150 under the last: the key's delete page and
    its owner's list keys through Django's machinery, 100 at most a relation and level, and count all 158."""
    owner = UserFactory(username="deep")
    top = ApiKey.objects.create(user=owner, name="top", prefix="top", secret_hash="top")
    parent = top
    for level in range(1, MAX_KEY_DEPTH):
        parent = ApiKey.objects.create(
            user=owner, parent=parent, name=f"l{level}", prefix=f"l{level}", secret_hash=f"l{level}"
        )
    ApiKey.objects.bulk_create(
        ApiKey(user=owner, parent=parent, name=f"leaf{n}", prefix=f"leaf{n}", secret_hash=f"leaf{n}")
        for n in range(150)
    )
    assert ApiKey.objects.count() == 158

    for url in (
        reverse("admin:billing_apikey_delete", args=[top.pk]),
        reverse("admin:auth_user_delete", args=[owner.pk]),
    ):
        page = admin_client.get(url)
        assert page.status_code == 200 and not page.context["protected"]
        assert dict(page.context["model_count"])["API keys"] == 158

    page = admin_client.get(reverse("admin:billing_apikey_delete", args=[top.pk]))
    assert "… and 50 more API keys" in page.content.decode()  # the top, 7 levels of one, the first 100 leaves

    assert admin_client.post(reverse("admin:billing_apikey_delete", args=[top.pk]), {"post": "yes"}).status_code == 302
    assert not ApiKey.objects.exists()


def test_the_delete_pages_of_a_deep_key_join_the_keys_table_to_itself_at_most_twice(admin_client):
    """The count of a key's keys below it, at every depth: one recursive query, not a join of the keys' table to
    itself once more each level. The count of the 158 keys below MAX_KEY_DEPTH levels joined the table up to 12 times
    in each of 13 subqueries, and PostgreSQL plans a query of 12 tables or more by its genetic optimizer, whose plan
    sometimes ran past 120 s (a CI run's PostgreSQL phase, three tests of this file). No query of either delete page
    joins the table to itself more than twice."""
    owner = UserFactory(username="deep")
    parent = top = ApiKey.objects.create(user=owner, name="top", prefix="top", secret_hash="top")
    for level in range(1, MAX_KEY_DEPTH):
        parent = ApiKey.objects.create(
            user=owner, parent=parent, name=f"l{level}", prefix=f"l{level}", secret_hash=f"l{level}"
        )
    ApiKey.objects.bulk_create(
        ApiKey(user=owner, parent=parent, name=f"leaf{n}", prefix=f"leaf{n}", secret_hash=f"leaf{n}") for n in range(5)
    )

    for url in (
        reverse("admin:billing_apikey_delete", args=[top.pk]),
        reverse("admin:auth_user_delete", args=[owner.pk]),
    ):
        with CaptureQueriesContext(connection) as queries:
            page = admin_client.get(url)
        assert dict(page.context["model_count"])["API keys"] == MAX_KEY_DEPTH + 5
        joins = max(len(re.findall(r'JOIN "billing_apikey"', query["sql"])) for query in queries)
        assert joins <= 2, url


def test_rotating_keys_costs_a_few_queries_a_batch_of_keys_and_shows_each_new_secret_once(admin_client, settings):
    """Rotating the keys selected: each gets a new secret, shown once, the old one working for the grace period,
    one audit event a key; a few queries a batch of keys, where each key cost about 7 (a lock, a save and its
    signal's walk of the keys below, the audit chain's lock, insert and head). A revoked key is named, not
    rotated."""

    from django.contrib.messages import get_messages

    from billing.services.keys import hash_key

    settings.LLMHUB_KEY_ROTATION_GRACE_SECONDS = 300

    def rotate(keys: list[ApiKey]) -> tuple[int, list[str]]:
        form = {"action": "rotate_selected", "_selected_action": [key.pk for key in keys]}
        with CaptureQueriesContext(connection) as queries:
            answer = admin_client.post(reverse("admin:billing_apikey_changelist"), form)
        assert answer.status_code == 302
        shown = [str(message) for message in get_messages(answer.wsgi_request)]  # with the earlier actions'
        return len(queries), shown[-len(keys) :]

    rotate(keys_in_bulk(1, start=5_000))  # the first fills Django's caches: not counted
    few, _ = rotate(keys_in_bulk(10, start=0))
    many_keys = keys_in_bulk(200, start=1_000)
    ApiKey.objects.filter(pk=many_keys[-1].pk).update(revoked_at=ApiKey.objects.get(pk=many_keys[0].pk).created_at)
    many, said = rotate(many_keys)

    assert len(said) == 200 and said[-1] == f"Not rotated (revoked or expired): {many_keys[-1].prefix}."
    secrets = {
        name: secret
        for message in said[:-1]
        for name, secret in re.findall(r"^(k\d+) .*the new key is (\S+) —", message)
    }
    assert len(secrets) == 199
    rotated = ApiKey.objects.filter(pk__in=[key.pk for key in many_keys[:-1]])
    for key in rotated:
        assert key.secret_hash == hash_key(secrets[key.name]) and key.previous_secret_hash == f"h{key.name[1:]}"
        assert key.previous_secret_expires_at == key.rotated_at + timedelta(seconds=300)
    assert ApiKey.objects.get(pk=many_keys[-1].pk).secret_hash == f"h{many_keys[-1].name[1:]}"
    assert many < few + 20  # more only by statements of batches: a few queries a key before
    targets = AuditEvent.objects.filter(action="key.rotate").values_list("target_id", flat=True)
    assert len(targets) == 1 + 10 + 199 and audit_verify() is None


def delete_users(admin_client, keys: list[ApiKey]) -> CaptureQueriesContext:
    form = {"action": "delete_selected", "_selected_action": sorted({key.user_id for key in keys}), "post": "yes"}
    with CaptureQueriesContext(connection) as queries:
        answer = admin_client.post(reverse("admin:auth_user_changelist"), form)
    assert answer.status_code == 302
    return queries


def test_deleting_users_records_each_of_their_keys_it_takes_with_it(admin_client):
    """A user's delete cascades to their gateway keys: they went with no event, while the keys' own delete records a
    ``key.delete`` a key (with the keys below it). A user's delete now records them so, whether one user goes (their
    delete page) or several (the bulk action), at a few queries a batch of keys, not a few a key."""
    one, first, few, many = (
        keys_in_bulk(count, start=start) for count, start in ((2, 0), (1, 50), (10, 100), (200, 1_000))
    )
    kept = keys_in_bulk(1, start=5_000)

    page = admin_client.post(reverse("admin:auth_user_delete", args=[one[0].user_id]), {"post": "yes"})
    assert page.status_code == 302
    delete_users(admin_client, first)  # the first fills Django's caches: not counted
    on_few = delete_users(admin_client, few)
    on_many = delete_users(admin_client, many)

    assert len(on_few) <= len(on_many) < len(on_few) + (len(many) - len(few)) // 10
    assert list(ApiKey.objects.filter(parent=None)) == kept and ApiKey.objects.count() == 2
    events = AuditEvent.objects.filter(action="key.delete").order_by("seq")
    assert [int(event.target_id) for event in events] == [key.pk for key in [*one, *first, *few, *many]]
    assert all(len(event.changes["keys_below"][0]) == 1 for event in events)  # the key created under each
    assert audit_verify() is None
