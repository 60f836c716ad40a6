"""Which of its owner's ledger rows a gateway key reads on /api/usage/ and /api/usage/summary/.

A key handed to an app, perhaps limited to one model, must not read every other app's requests (models,
tokens, costs, timings, key prefixes): a key reads the rows of its own subtree (itself and the keys created
under it, the subtree ``keys:manage`` manages), unless it holds the ``usage:read`` scope, which reads all of
its owner's rows as the owner does. A person (session, JWT) reads all of theirs; operators and admins keep
``?user=``."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest
from rest_framework.test import APIClient

from accounts.roles import Role, role_set
from billing.models import ApiKey, KeyScope
from billing.services.keys import api_key_change, api_key_create
from tests.factories import UsageRecordFactory, UserFactory
from tests.waiting import wait_for_record

USAGE_READ = KeyScope.USAGE_READ.value
KEYS_MANAGE = KeyScope.KEYS_MANAGE.value


def key_client(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def listed(client, **query) -> list[str]:
    response = client.get("/api/usage/", {"limit": 100, **query})
    assert response.status_code == 200, response.content
    return sorted(row["request_id"] for row in response.json()["results"])


@pytest.fixture
def alice(db):
    return UserFactory(username="alice")


@pytest.fixture
def family(alice):
    """Alice's keys: ``parent`` (keys:manage) with ``child`` and ``grandchild`` under it, created by keys
    through the API, and ``sibling``, another app's key; one ledger row each, and one of Alice's own."""
    parent = api_key_create(user=alice, name="parent", scopes=[KEYS_MANAGE])
    created = key_client(parent.secret).post("/api/keys/", {"name": "child", "scopes": [KEYS_MANAGE]}, format="json")
    assert created.status_code == 201, created.content
    child_secret = created.json()["secret"]
    created = key_client(child_secret).post("/api/keys/", {"name": "grandchild"}, format="json")
    assert created.status_code == 201, created.content
    grandchild_secret = created.json()["secret"]
    sibling = api_key_create(user=alice, name="sibling")
    keys = {name: ApiKey.objects.get(user=alice, name=name) for name in ("parent", "child", "grandchild", "sibling")}
    rows = {name: UsageRecordFactory(user=alice, api_key=key, cost=Decimal("0.25")) for name, key in keys.items()}
    rows = {name: row.request_id for name, row in rows.items()}
    rows["person"] = UsageRecordFactory(user=alice, api_key=None, endpoint="websocket", cost=Decimal("0.25")).request_id
    UsageRecordFactory(user=UserFactory(username="bob"))
    secrets = {
        "parent": parent.secret,
        "child": child_secret,
        "grandchild": grandchild_secret,
        "sibling": sibling.secret,
    }
    return {"keys": keys, "rows": rows, "secrets": secrets}


@pytest.mark.django_db
def test_a_key_reads_only_the_usage_of_its_own_subtree(family):
    rows, secrets = family["rows"], family["secrets"]

    assert listed(key_client(secrets["parent"])) == sorted(rows[n] for n in ("parent", "child", "grandchild"))
    assert listed(key_client(secrets["child"])) == sorted(rows[n] for n in ("child", "grandchild"))
    assert listed(key_client(secrets["grandchild"])) == [rows["grandchild"]]
    assert listed(key_client(secrets["sibling"])) == [rows["sibling"]]


@pytest.mark.django_db
def test_the_summary_sums_only_the_keys_subtree(family):
    summary = key_client(family["secrets"]["child"]).get("/api/usage/summary/")

    assert summary.status_code == 200, summary.content
    assert summary.json()["total"]["requests"] == 2
    assert summary.json()["total"]["cost"] == "0.5000000000"
    assert sum(day["requests"] for day in summary.json()["by_day"]) == 2
    assert sum(model["requests"] for model in summary.json()["by_model"]) == 2


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/usage/", "/api/usage/summary/"])
def test_the_key_filter_finds_nothing_outside_the_subtree(family, path):
    """Naming a key out of its reach (by id or prefix) reads nothing of it, exactly like a key of nobody's."""
    child = key_client(family["secrets"]["child"])
    for outside in (family["keys"]["sibling"], family["keys"]["parent"]):
        for value in (outside.prefix, str(outside.pk)):
            response = child.get(path, {"key": value})
            assert response.status_code == 200, response.content
            body = response.json()
            assert (body["count"] if path == "/api/usage/" else body["total"]["requests"]) == 0
    inside = family["keys"]["grandchild"]
    assert listed(child, key=inside.prefix) == [family["rows"]["grandchild"]]


@pytest.mark.django_db
def test_a_key_with_usage_read_and_a_person_read_all_of_the_owners_usage(alice, family):
    everything = sorted(family["rows"].values())
    reader = api_key_create(user=alice, name="accounting", scopes=[USAGE_READ])
    assert listed(key_client(reader.secret)) == everything
    summary = key_client(reader.secret).get("/api/usage/summary/").json()
    assert summary["total"]["requests"] == 5 and summary["total"]["cost"] == "1.2500000000"

    person = APIClient()
    person.force_login(alice)
    assert listed(person) == everything


@pytest.mark.django_db
def test_a_child_gets_usage_read_only_from_a_parent_that_holds_it_and_loses_it_with_the_parent(alice, family):
    refused = key_client(family["secrets"]["parent"]).post(
        "/api/keys/", {"name": "escape", "scopes": [USAGE_READ]}, format="json"
    )
    assert refused.status_code == 400, refused.content
    assert refused.json()["error"]["param"] == "scopes"

    wide = api_key_create(user=alice, name="wide", scopes=[KEYS_MANAGE, USAGE_READ])
    created = key_client(wide.secret).post("/api/keys/", {"name": "reader", "scopes": [USAGE_READ]}, format="json")
    assert created.status_code == 201, created.content
    reader = key_client(created.json()["secret"])
    assert len(listed(reader)) == 5

    wide.api_key.scopes = [KEYS_MANAGE]
    api_key_change(api_key=wide.api_key)

    assert listed(reader) == []  # the reader's own subtree has no rows


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/usage/", "/api/usage/summary/"])
def test_an_operators_key_needs_usage_read_for_another_users_usage(path):
    operator = UserFactory(username="ops")
    role_set(operator, Role.OPERATOR)
    grace = UserFactory(username="grace")
    UsageRecordFactory(user=grace)
    plain = api_key_create(user=operator, name="app").secret
    reader = api_key_create(user=operator, name="accounting", scopes=[USAGE_READ]).secret

    refused = key_client(plain).get(path, {"user": "grace"})
    assert refused.status_code == 403, refused.content
    assert "usage:read" in refused.json()["error"]["message"]
    allowed = key_client(reader).get(path, {"user": "grace"})
    assert allowed.status_code == 200, allowed.content
    body = allowed.json()
    assert (body["count"] if path == "/api/usage/" else body["total"]["requests"]) == 1


@pytest.mark.django_db
def test_the_scope_is_offered_on_the_keys_api_and_in_the_schema(alice):
    person = APIClient()
    person.force_login(alice)
    response = person.post("/api/keys/", {"name": "accounting", "scopes": [USAGE_READ]}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["scopes"] == [USAGE_READ]
    schema = person.get("/api/schema/", {"format": "json"}).json()
    assert USAGE_READ in schema["components"]["schemas"]["ScopesEnum"]["enum"]
    assert "usage:read" in schema["paths"]["/api/usage/"]["get"]["description"]
    assert "usage:read" in schema["paths"]["/api/usage/summary/"]["get"]["description"]


# THROUGH THE LIVE GATEWAY


@pytest.mark.django_db(transaction=True)
def test_requests_made_by_other_keys_are_not_in_a_keys_usage(llmhub_server, catalog):
    """Real requests through /v1 with the openai SDK, by a parent key, the child it created over the API, and
    another app's key; the parent reads its own and its child's, the child only its own."""
    alice = UserFactory(username="alice")
    parent = api_key_create(user=alice, name="parent", scopes=[KEYS_MANAGE])
    other = api_key_create(user=alice, name="other app")
    api = httpx.Client(base_url=llmhub_server.url, timeout=20)
    created = api.post("/api/keys/", json={"name": "child"}, headers={"Authorization": f"Bearer {parent.secret}"})
    assert created.status_code == 201, created.text
    child_secret = created.json()["secret"]

    made = {}
    for name, secret in (("parent", parent.secret), ("child", child_secret), ("other", other.secret)):
        client = openai.OpenAI(base_url=llmhub_server.url + "/v1", api_key=secret, max_retries=0, timeout=20)
        raw = client.chat.completions.with_raw_response.create(
            model="cheap-model", messages=[{"role": "user", "content": f"hello from {name}"}]
        )
        made[name] = raw.headers["x-request-id"]
        wait_for_record(made[name])

    def usage(secret: str) -> tuple[list[str], int]:
        headers = {"Authorization": f"Bearer {secret}"}
        rows = api.get("/api/usage/", headers=headers)
        summary = api.get("/api/usage/summary/", headers=headers)
        assert rows.status_code == summary.status_code == 200, (rows.text, summary.text)
        return sorted(row["request_id"] for row in rows.json()["results"]), summary.json()["total"]["requests"]

    assert usage(parent.secret) == (sorted([made["parent"], made["child"]]), 2)
    assert usage(child_secret) == ([made["child"]], 1)
    assert usage(other.secret) == ([made["other"]], 1)
    api.close()


@pytest.mark.django_db
def test_the_admin_offers_the_scope(admin_client):
    page = admin_client.get("/admin/billing/apikey/add/")

    assert page.status_code == 200
    assert 'value="usage:read"' in page.content.decode()
    assert "Read all of the owner&#x27;s usage" in page.content.decode()
