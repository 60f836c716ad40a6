"""Reading the audit log: the admin shows it read-only (no add, change or delete, not even for a superuser),
filters and exports it as CSV; ``/api/audit/`` is for staff only, filtered and paginated, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime

import pytest
import time_machine
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from audit.context import AuditOrigin, audit_origin
from audit.exports import CSV_COLUMNS
from audit.models import AuditChainHead, AuditEvent
from audit.services import audit_record, audit_verify
from billing.models import KeyScope
from billing.services.keys import api_key_create
from tests.accounts.conftest import identity_provider_server, idp, jwt_on  # noqa: F401 (fixtures)
from tests.factories import ModelFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def recorded(db) -> list[AuditEvent]:
    """Three events on three days, by a user, a key and the system, from an empty log."""
    AuditEvent.objects.all().delete()
    AuditChainHead.objects.all().delete()
    made = []
    origins = [
        ("2026-11-01T10:00:00", AuditOrigin("user", "5", "alice", "198.51.100.1", "browser/1")),
        ("2026-11-02T10:00:00", AuditOrigin("key", "9", "sk-llmhub-abc", "198.51.100.2", "sdk/2")),
        ("2026-11-03T10:00:00", None),
    ]
    actions = ["providers.provider.change", "provider_key.add", "auth.login_failed"]
    for (instant, origin), action in zip(origins, actions, strict=True):
        with time_machine.travel(datetime.fromisoformat(instant).replace(tzinfo=UTC), tick=False):
            with audit_origin(origin) if origin else _no_origin():
                made.append(
                    audit_record(
                        action,
                        target_type="providers.provider",
                        target_id=str(len(made) + 1),
                        target_repr='=HYPERLINK("http://x")' if len(made) == 2 else f"p{len(made)}",
                        changes={"timeout_seconds": ["10.0", "42.5"], "api_key": ["a", "b"]},
                    )
                )
    return made


class _no_origin:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def staff_client(db) -> Client:
    client = Client()
    client.force_login(UserFactory(username="staffer", is_staff=True))
    return client


@pytest.fixture
def superuser_client(db) -> Client:
    from django.contrib.auth import get_user_model

    client = Client()
    client.force_login(get_user_model().objects.create_superuser("boss", "boss@example.com", "pw-for-tests-123"))
    return client


def listed(page: str) -> list[str]:
    """The actions in the change list's rows (the filter sidebar names actions too)."""
    return re.findall(r'<td class="field-action">([^<]*)</td>', page)


def rows(response) -> list[dict[str, str]]:
    assert response["Content-Type"].startswith("text/csv")
    body = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(body)))


# THE ADMIN


def test_the_admin_lists_events_and_allows_no_add_change_or_delete(superuser_client, recorded):
    listing = superuser_client.get(reverse("admin:audit_auditevent_changelist"))
    assert listing.status_code == 200
    page = listing.content.decode()
    assert "providers.provider.change" in page and "198.51.100.1" in page and "alice" in page
    assert reverse("admin:audit_auditevent_add") not in page
    assert 'value="delete_selected"' not in page
    assert reverse("admin:audit_auditevent_export") in page  # the "Export these as CSV" link

    assert superuser_client.get(reverse("admin:audit_auditevent_add")).status_code == 403
    event = recorded[0]
    detail = superuser_client.get(reverse("admin:audit_auditevent_change", args=[event.seq]))
    assert detail.status_code == 200
    assert 'name="action"' not in detail.content.decode() and "_save" not in detail.content.decode()
    edit = superuser_client.post(reverse("admin:audit_auditevent_change", args=[event.seq]), {"action": "x.y"})
    assert edit.status_code == 403
    delete = superuser_client.post(reverse("admin:audit_auditevent_delete", args=[event.seq]), {"post": "yes"})
    assert delete.status_code == 403
    bulk = superuser_client.post(
        reverse("admin:audit_auditevent_changelist"),
        {"action": "delete_selected", "_selected_action": [event.seq], "post": "yes"},
    )
    assert bulk.status_code in (200, 302)
    assert AuditEvent.objects.count() == 3
    assert AuditEvent.objects.get(seq=event.seq).action == "providers.provider.change"
    assert audit_verify() is None


def test_the_admin_filters_and_searches(superuser_client, recorded):
    url = reverse("admin:audit_auditevent_changelist")

    by_actor_type = superuser_client.get(url, {"actor_type__exact": "key"}).content.decode()
    by_search = superuser_client.get(url, {"q": "alice"}).content.decode()
    by_day = superuser_client.get(
        url, {"created_at__gte": "2026-11-03 00:00:00+00:00", "created_at__lt": "2026-11-04 00:00:00+00:00"}
    ).content.decode()

    assert listed(by_actor_type) == ["provider_key.add"]
    assert listed(by_search) == ["providers.provider.change"]
    assert listed(by_day) == ["auth.login_failed"]


def test_the_admin_exports_the_selection_and_the_filtered_list_as_csv(superuser_client, recorded):
    selected = superuser_client.post(
        reverse("admin:audit_auditevent_changelist"),
        {"action": "export_csv", "_selected_action": [recorded[0].seq, recorded[2].seq]},
    )
    filtered = superuser_client.get(reverse("admin:audit_auditevent_export"), {"actor_type__exact": "key"})

    assert [row["action"] for row in rows(selected)] == ["auth.login_failed", "providers.provider.change"]
    exported = rows(filtered)
    assert [row["action"] for row in exported] == ["provider_key.add"]
    assert list(exported[0]) == list(CSV_COLUMNS)


def test_the_admin_is_closed_to_staff_without_the_view_permission(staff_client, recorded):
    assert staff_client.get(reverse("admin:audit_auditevent_changelist")).status_code == 403
    assert staff_client.get(reverse("admin:audit_auditevent_export")).status_code == 403


# CSV


def test_the_csv_has_every_column_changes_as_json_and_no_formula(staff_client, recorded):
    exported = rows(staff_client.get("/api/audit/export.csv"))

    assert [int(row["seq"]) for row in exported] == [3, 2, 1]
    first = exported[2]
    assert first["created_at"] == "2026-11-01T10:00:00.000000+00:00"
    assert (first["actor_type"], first["actor_id"], first["actor_repr"]) == ("user", "5", "alice")
    assert (first["ip_address"], first["user_agent"]) == ("198.51.100.1", "browser/1")
    assert json.loads(first["changes"]) == {"timeout_seconds": ["10.0", "42.5"], "api_key": ["[secret]", "[secret]"]}
    assert first["hash"] == recorded[0].hash and first["prev_hash"] == "0" * 64
    assert exported[0]["target_repr"] == '\'=HYPERLINK("http://x")'  # text, not a formula, in a spreadsheet
    assert exported[0]["actor_type"] == "system" and exported[0]["ip_address"] == ""


def test_format_csv_on_the_list_is_the_export_and_its_errors_stay_json(staff_client, recorded):
    as_list = rows(staff_client.get("/api/audit/", {"format": "csv", "actor": "alice"}))
    as_export = rows(staff_client.get("/api/audit/export.csv", {"actor": "alice"}))
    assert as_list == as_export and [row["actor_repr"] for row in as_list] == ["alice"]

    refused = staff_client.get("/api/audit/", {"format": "csv", "since": "yesterday-ish"})
    assert refused.status_code == 400
    assert refused["Content-Type"].startswith("application/json")
    assert refused.json()["error"]["param"] == "since"


# THE API


def test_the_api_lists_newest_first_with_every_field(staff_client, recorded):
    response = staff_client.get("/api/audit/")

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3
    assert [event["seq"] for event in body["results"]] == [3, 2, 1]
    first = body["results"][2]
    assert first["action"] == "providers.provider.change"
    assert first["changes"] == {"timeout_seconds": ["10.0", "42.5"], "api_key": ["[secret]", "[secret]"]}
    assert (first["actor_repr"], first["ip_address"], first["hash"]) == ("alice", "198.51.100.1", recorded[0].hash)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"action": "provider_key.add"}, [2]),
        ({"action": "providers."}, [1]),
        ({"actor": "alice"}, [1]),
        ({"actor": "key:9"}, [2]),
        ({"actor": "system"}, [3]),
        ({"target_type": "providers.provider", "target_id": "3"}, [3]),
        ({"since": "2026-11-02"}, [3, 2]),
        ({"until": "2026-11-02T10:00:00Z"}, [1]),
        ({"since": "2026-11-02", "until": "2026-11-03"}, [2]),
        ({"limit": "1", "offset": "1"}, [2]),
    ],
)
def test_the_api_filters(staff_client, recorded, query, expected):
    response = staff_client.get("/api/audit/", query)

    assert response.status_code == 200, response.content
    assert [event["seq"] for event in response.json()["results"]] == expected


@pytest.mark.parametrize(
    "query", [{"since": "yesterday"}, {"since": "2026-11-03", "until": "2026-11-01"}, {"actor": "a\x00b"}]
)
def test_the_api_refuses_bad_filters_in_openais_shape(staff_client, recorded, query):
    response = staff_client.get("/api/audit/", query)

    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_api_answers_csv_with_the_same_filters(staff_client, recorded):
    as_format = staff_client.get("/api/audit/", {"format": "csv", "actor": "alice"})
    as_path = staff_client.get("/api/audit/export.csv", {"actor": "alice"})

    assert [row["seq"] for row in rows(as_format)] == ["1"]
    assert [row["seq"] for row in rows(as_path)] == ["1"]


def test_the_api_is_for_staff_only(recorded):
    member = UserFactory(username="member")
    key = api_key_create(user=member, name="k")
    as_key = APIClient()
    as_key.credentials(HTTP_AUTHORIZATION=f"Bearer {key.secret}")
    as_session = Client()
    as_session.force_login(member)

    for client in (as_key, as_session):
        for url in ("/api/audit/", "/api/audit/?format=csv", "/api/audit/export.csv"):
            response = client.get(url)
            assert response.status_code == 403, (client, url)
            assert response["Content-Type"].startswith("application/json")
            assert "error" in response.json()
    assert APIClient().get("/api/audit/").status_code == 401


AUDIT_URLS = ("/api/audit/", "/api/audit/?format=csv", "/api/audit/export.csv")


def key_client(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def test_a_staff_users_gateway_key_reads_the_log_only_with_the_audit_read_scope(recorded):
    """A key handed to an app (here limited to one model) must not read the whole audit log because its owner
    is staff: it needs ``audit:read``, and its owner must still be staff."""
    staffer = UserFactory(username="ops", is_staff=True)
    model = ModelFactory(name="only-model")
    plain = api_key_create(user=staffer, name="app", allowed_models=[model])
    reader = api_key_create(user=staffer, name="auditor", scopes=[KeyScope.AUDIT_READ])

    for url in AUDIT_URLS:
        refused = key_client(plain.secret).get(url)
        assert refused.status_code == 403, url
        assert refused["Content-Type"].startswith("application/json")
        assert "audit:read" in refused.json()["error"]["message"]
    assert key_client(reader.secret).get("/api/audit/", {"action": "provider_key.add"}).json()["count"] == 1
    mine = {"until": "2026-11-04"}  # the recorded three, not the events of making the keys
    assert [row["seq"] for row in rows(key_client(reader.secret).get("/api/audit/export.csv", mine))] == ["3", "2", "1"]
    as_csv = key_client(reader.secret).get("/api/audit/", {"format": "csv", **mine})
    assert [row["seq"] for row in rows(as_csv)] == ["3", "2", "1"]

    staffer.is_staff = False
    staffer.save()
    for url in AUDIT_URLS:
        assert key_client(reader.secret).get(url).status_code == 403, url


def test_a_staff_person_reads_the_log_with_a_session_or_a_jwt(staff_client, recorded, jwt_on):  # noqa: F811
    assert staff_client.get("/api/audit/").json()["count"] == 3
    token = jwt_on.token(sub="admin-1", preferred_username="root", role="admin")
    response = APIClient().get("/api/audit/", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    assert response.json()["count"] >= 3


def test_the_scope_is_offered_and_documented(admin_client):
    page = admin_client.get("/admin/billing/apikey/add/").content.decode()
    assert 'value="audit:read"' in page and "Read the audit log" in page
    schema = admin_client.get("/api/schema/", {"format": "json"}).json()
    assert "audit:read" in schema["components"]["schemas"]["ScopesEnum"]["enum"]
    for path in ("/api/audit/", "/api/audit/export.csv"):
        assert "audit:read" in schema["paths"][path]["get"]["description"]


def test_the_keys_page_offers_the_scope_to_staff_only(staff_client):
    assert 'id="key-audit"' in staff_client.get("/keys/").content.decode()
    member = Client()
    member.force_login(UserFactory(username="member"))
    assert 'id="key-audit"' not in member.get("/keys/").content.decode()
