"""The audit log's admin list at production size (it grows with every sign-in and change): what it may ask of
a table of millions of rows. The timings behind each rule are in docs/ledger.md ("The admin at scale")."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse

from audit.context import AuditOrigin, audit_origin
from audit.models import AuditEvent
from audit.services import audit_record
from tests.admin_pages import changelist_page

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:audit_auditevent_changelist")


def log_page(client: Client, **params: str) -> tuple[list[str], list[str], str]:
    """The actions of the events the list shows, the SQL of every query that read the log, and the page."""
    page = changelist_page(client, CHANGELIST, "audit_auditevent", params)
    return [event.action for event in page.rows], page.reads, page.html


def test_the_filters_list_the_actions_and_target_types_without_a_pass_over_the_log(admin_client):
    AuditEvent.objects.all().delete()
    audit_record("key.create", target_type="billing.apikey", target_id="1", actor=None)
    audit_record("key.rotate", target_type="billing.apikey", target_id="1", actor=None)
    audit_record("providers.provider.change", target_type="providers.provider", target_id="2", actor=None)
    audit_record("auth.signin", actor=None)

    shown, reads, page = log_page(admin_client)

    assert len(shown) == 4
    # Neither DISTINCT over the log (the filters' choices) nor the date hierarchy's distinct months.
    assert not [sql for sql in reads if "DISTINCT" in sql], reads
    for choice in ("action=key.create", "action=key.rotate", "action=providers.provider.change", "action=auth.signin"):
        assert f'href="?{choice}"' in page
    for choice in ("target_type=billing.apikey", "target_type=providers.provider"):
        assert f'href="?{choice}"' in page
    assert log_page(admin_client, action="key.rotate")[0] == ["key.rotate"]
    assert log_page(admin_client, target_type="billing.apikey")[0] == ["key.rotate", "key.create"]
    assert "Past 7 days" in page  # dates by the date filter's ranges


def test_the_search_finds_whole_values_through_the_indexes(admin_client):
    """An actor (as the API's ``actor`` filter takes it), an action, a target's id or name, an IP address: each
    looked up whole, in an index. ``LIKE '%…%'`` on seven columns read the whole log, for the rows, their count
    and the date hierarchy."""
    AuditEvent.objects.all().delete()
    with audit_origin(AuditOrigin("user", "5", "alice", "198.51.100.1", "browser/1")):
        audit_record("key.create", target_type="billing.apikey", target_id="41", target_repr="sk-llmhub-ab12…")
    with audit_origin(AuditOrigin("key", "9", "sk-llmhub-cd34…", "198.51.100.2", "sdk/2")):
        audit_record("providers.provider.change", target_type="providers.provider", target_id="7", target_repr="east")

    def search(term: str) -> list[str]:
        shown, reads, _ = log_page(admin_client, q=term)
        assert not [sql for sql in reads if "LIKE" in sql], reads
        return shown

    assert search("alice") == ["key.create"]
    assert search(" key:9 ") == ["providers.provider.change"]
    assert search("providers.provider.change") == ["providers.provider.change"]
    assert search("41") == ["key.create"]
    assert search("east") == ["providers.provider.change"]
    assert search("198.51.100.2") == ["providers.provider.change"]
    assert search("ali") == []  # a part is not looked up: it would read the whole log
    assert "exactly" in log_page(admin_client)[2]  # the search box says so


def test_the_searched_columns_are_indexed():
    """What the search and the API's filters look up, each the first column of an index of the log."""
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, AuditEvent._meta.db_table)
    leading = {c["columns"][0] for c in constraints.values() if c["index"] or c["unique"]}
    assert {"action", "actor_repr", "actor_type", "target_id", "target_repr", "ip_address", "target_type"} <= leading
