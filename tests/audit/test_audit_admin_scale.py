"""The audit log's admin list at production size (it grows with every sign-in and change): what it may ask of
a table of millions of rows. The timings behind each rule are in docs/ledger.md ("The admin at scale")."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.models import AuditEvent
from audit.services import audit_record

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:audit_auditevent_changelist")


def log_page(client: Client, **params: str) -> tuple[list[str], list[str], str]:
    """The actions of the events the list shows, the SQL of every query that read the log, and the page."""
    with CaptureQueriesContext(connection) as captured:
        response = client.get(CHANGELIST, params)
    assert response.status_code == 200
    reads = [query["sql"] for query in captured if '"audit_auditevent"' in query["sql"]]
    return [event.action for event in response.context["cl"].result_list], reads, response.content.decode()


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
