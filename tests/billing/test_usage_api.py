"""/api/usage/ and /api/usage/summary/: a user's own ledger rows, filtered, paginated and summed exactly."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from billing.models import UsageStatus
from billing.services.keys import api_key_create
from tests.factories import UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

RECORD_FIELDS = {
    "request_id",
    "created_at",
    "model",
    "provider",
    "operation",
    "endpoint",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "web_search_requests",
    "service_tier",
    "cost",
    "usage_estimated",
    "status",
    "error_type",
    "ttft_ms",
    "duration_ms",
    "key",
}


def at(day: int, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(2025, 3, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def alice():
    return UserFactory(username="alice")


@pytest.fixture
def client(alice) -> APIClient:
    client = APIClient()
    client.force_login(alice)
    return client


@pytest.fixture
def ledger(alice):
    """Alice's five rows over three days and two keys, and one of Bob's on the same days."""
    work = api_key_create(user=alice, name="work").api_key
    home = api_key_create(user=alice, name="home").api_key
    bob = UserFactory(username="bob")
    rows = {
        "a": UsageRecordFactory(
            user=alice,
            api_key=work,
            created_at=at(1, 9),
            model_name="gpt-test",
            cost=Decimal("0.0015000000"),
            prompt_tokens=1000,
            completion_tokens=2000,
        ),
        "b": UsageRecordFactory(
            user=alice,
            api_key=work,
            created_at=at(1, 23, 59),
            model_name="claude-test",
            cost=Decimal("0.0020000001"),
            prompt_tokens=300,
            completion_tokens=400,
            stream=True,
            ttft_ms=85,
            web_search_requests=3,
        ),
        "c": UsageRecordFactory(
            user=alice,
            api_key=home,
            created_at=at(2, 0, 0),
            model_name="gpt-test",
            cost=Decimal("0.0000000007"),
            prompt_tokens=7,
            completion_tokens=0,
            status=UsageStatus.UPSTREAM_ERROR,
            error_type="upstream_timeout",
        ),
        "d": UsageRecordFactory(
            user=alice,
            api_key=home,
            operation="responses",
            created_at=at(3, 15),
            model_name="gpt-test",
            cost=Decimal("1.2345678901"),
            prompt_tokens=50_000,
            completion_tokens=60_000,
            cached_tokens=10_000,
            cache_write_tokens=4_000,
            cache_write_1h_tokens=1_500,
            web_search_requests=1,
            service_tier="priority",
            usage_estimated=True,
        ),
        "e": UsageRecordFactory(
            user=alice,
            api_key=None,
            endpoint="websocket",
            created_at=at(3, 16),
            model_name="claude-test",
            cost=Decimal("0"),
            prompt_tokens=0,
            completion_tokens=0,
            status=UsageStatus.REJECTED,
        ),
        "bob": UsageRecordFactory(
            user=bob,
            created_at=at(2, 12),
            model_name="gpt-test",
            cost=Decimal("99"),
            prompt_tokens=5,
            completion_tokens=5,
        ),
    }
    return {"work": work, "home": home, **rows}


def ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [row["request_id"] for row in response.json()["results"]]


def test_lists_own_records_newest_first_with_every_field(client, ledger):
    response = client.get("/api/usage/")

    assert ids(response) == [ledger[n].request_id for n in "edcba"]
    assert response.json()["count"] == 5
    rows = {row["request_id"]: row for row in response.json()["results"]}
    assert all(set(row) == RECORD_FIELDS for row in rows.values())
    d = rows[ledger["d"].request_id]
    assert d == {
        "request_id": ledger["d"].request_id,
        "created_at": "2025-03-03T15:00:00Z",
        "model": "gpt-test",
        "provider": "fake-openai",
        "operation": "responses",
        "endpoint": "rest",
        "stream": False,
        "prompt_tokens": 50_000,
        "completion_tokens": 60_000,
        "cached_tokens": 10_000,
        "cache_write_tokens": 4_000,
        "cache_write_1h_tokens": 1_500,
        "web_search_requests": 1,
        "service_tier": "priority",
        "cost": "1.2345678901",
        "usage_estimated": True,
        "status": "ok",
        "error_type": "",
        "ttft_ms": None,
        "duration_ms": 120,
        "key": ledger["home"].prefix,
    }
    assert rows[ledger["e"].request_id]["key"] is None
    assert (rows[ledger["b"].request_id]["ttft_ms"], rows[ledger["b"].request_id]["web_search_requests"]) == (85, 3)


def test_never_shows_another_users_records(client, ledger):
    assert ledger["bob"].request_id not in ids(client.get("/api/usage/", {"limit": 100}))
    bob_client = APIClient()
    bob_client.force_login(ledger["bob"].user)
    assert ids(bob_client.get("/api/usage/")) == [ledger["bob"].request_id]
    # Filtering by Alice's key from Bob's account finds nothing of hers.
    assert ids(bob_client.get("/api/usage/", {"key": ledger["work"].prefix})) == []


def test_works_with_an_api_key_too(ledger, alice):
    """A key reads its own rows, or all of its owner's with the usage:read scope (test_usage_reach.py)."""
    secret = api_key_create(user=alice, name="reader", scopes=["usage:read"]).secret
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")

    assert len(ids(client.get("/api/usage/"))) == 5


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"start": "2025-03-02"}, "edc"),
        ({"end": "2025-03-01"}, "ba"),  # a date end covers its whole day
        ({"start": "2025-03-01", "end": "2025-03-01"}, "ba"),
        ({"start": "2025-03-01T23:59:00Z", "end": "2025-03-02T00:00:00Z"}, "cb"),  # datetimes are inclusive
        ({"start": "2025-03-01T23:59:00.000001Z"}, "edc"),
        ({"start": "2025-03-03T15:00:00+01:00"}, "ed"),  # 14:00 UTC
        ({"start": "2025-03-03T15:30:00"}, "e"),  # a naive datetime is UTC
        ({"model": "gpt-test"}, "dca"),
        ({"model": "no-such-model"}, ""),
        ({"status": "upstream_error"}, "c"),
        ({"model": "gpt-test", "status": "ok", "start": "2025-03-02"}, "d"),
    ],
)
def test_filters(client, ledger, query, expected):
    assert ids(client.get("/api/usage/", query)) == [ledger[n].request_id for n in expected]


def test_filter_by_key_id_or_prefix(client, ledger):
    by_prefix = ids(client.get("/api/usage/", {"key": ledger["home"].prefix}))
    by_id = ids(client.get("/api/usage/", {"key": str(ledger["home"].pk)}))

    assert by_prefix == by_id == [ledger["d"].request_id, ledger["c"].request_id]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"start": "yesterday"}, "start"),
        ({"start": "2025-02-30"}, "start"),
        ({"end": "2025-03-01T25:00:00Z"}, "end"),
        ({"start": "2025-03-02", "end": "2025-03-01"}, "end"),
        ({"start": "2025-03-01T12:00:00Z", "end": "2025-03-01T11:59:59Z"}, "end"),
        ({"status": "fine"}, "status"),
        ({"key": "sk llmhub!"}, "key"),
        ({"key": "9" * 40}, "key"),
        ({"model": "m" * 129}, "model"),
        # Written in range, but not as an instant in UTC (the database's): a 500 before.
        ({"start": "0001-01-01T00:00:00+14:00"}, "start"),
        ({"end": "0001-01-01T05:00:00+06:00"}, "end"),
        ({"start": "9999-12-31T23:00:00-14:00"}, "start"),
    ],
)
@pytest.mark.parametrize("path", ["/api/usage/", "/api/usage/summary/"])
def test_bad_filters_are_400_naming_the_param(client, ledger, path, query, param):
    response = client.get(path, query)

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_pagination(client, ledger):
    first = client.get("/api/usage/", {"limit": 2}).json()
    second = client.get("/api/usage/", {"limit": 2, "offset": 2}).json()
    last = client.get("/api/usage/", {"limit": 2, "offset": 4}).json()

    assert first["count"] == second["count"] == last["count"] == 5
    assert first["previous"] is None and first["next"] is not None and last["next"] is None
    pages = [row["request_id"] for page in (first, second, last) for row in page["results"]]
    assert pages == [ledger[n].request_id for n in "edcba"]


def test_summary_totals_equal_the_sum_of_the_rows(client, ledger):
    rows = client.get("/api/usage/", {"limit": 100}).json()["results"]
    summary = client.get("/api/usage/summary/").json()

    assert summary["total"] == {
        "requests": len(rows),
        "prompt_tokens": sum(row["prompt_tokens"] for row in rows),
        "completion_tokens": sum(row["completion_tokens"] for row in rows),
        "cached_tokens": sum(row["cached_tokens"] for row in rows),
        "cache_write_tokens": sum(row["cache_write_tokens"] for row in rows),
        "cache_write_1h_tokens": sum(row["cache_write_1h_tokens"] for row in rows),
        "web_search_requests": sum(row["web_search_requests"] for row in rows),
        "cost": str(sum(Decimal(row["cost"]) for row in rows)),
    }
    assert summary["total"]["web_search_requests"] == 4
    assert summary["total"]["cost"] == "1.2380678909"
    assert summary["by_day"] == [
        {
            "day": "2025-03-01",
            "requests": 2,
            "prompt_tokens": 1300,
            "completion_tokens": 2400,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "cache_write_1h_tokens": 0,
            "web_search_requests": 3,
            "cost": "0.0035000001",
        },
        {
            "day": "2025-03-02",
            "requests": 1,
            "prompt_tokens": 7,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "cache_write_1h_tokens": 0,
            "web_search_requests": 0,
            "cost": "0.0000000007",
        },
        {
            "day": "2025-03-03",
            "requests": 2,
            "prompt_tokens": 50_000,
            "completion_tokens": 60_000,
            "cached_tokens": 10_000,
            "cache_write_tokens": 4_000,
            "cache_write_1h_tokens": 1_500,
            "web_search_requests": 1,
            "cost": "1.2345678901",
        },
    ]
    assert summary["by_model"] == [
        {
            "model": "claude-test",
            "requests": 2,
            "prompt_tokens": 300,
            "completion_tokens": 400,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "cache_write_1h_tokens": 0,
            "web_search_requests": 3,
            "cost": "0.0020000001",
        },
        {
            "model": "gpt-test",
            "requests": 3,
            "prompt_tokens": 51_007,
            "completion_tokens": 62_000,
            "cached_tokens": 10_000,
            "cache_write_tokens": 4_000,
            "cache_write_1h_tokens": 1_500,
            "web_search_requests": 1,
            "cost": "1.2360678908",
        },
    ]
    for breakdown in ("by_day", "by_model"):
        assert sum(Decimal(entry["cost"]) for entry in summary[breakdown]) == Decimal(summary["total"]["cost"])
        assert sum(entry["requests"] for entry in summary[breakdown]) == summary["total"]["requests"]
        assert sum(entry["web_search_requests"] for entry in summary[breakdown]) == 4


def test_summary_takes_the_same_filters(client, ledger):
    summary = client.get("/api/usage/summary/", {"key": ledger["work"].prefix, "model": "gpt-test"}).json()

    assert summary["total"] == {
        "requests": 1,
        "prompt_tokens": 1000,
        "completion_tokens": 2000,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "cache_write_1h_tokens": 0,
        "web_search_requests": 0,
        "cost": "0.0015000000",
    }
    assert [entry["day"] for entry in summary["by_day"]] == ["2025-03-01"]
    assert [entry["model"] for entry in summary["by_model"]] == ["gpt-test"]


def test_summary_sums_per_operation_every_row_once(client, alice):
    """An operator could not tell how much went to the Responses API, chat completions, embeddings or the Messages
    API: the summary grouped by day and model only. ``by_operation`` sums the same rows per operation, a refused
    request whose model name matched no model included (it was a request of that API all the same)."""
    spent = {
        "chat": ["0.0000000001", "0.25"],
        "messages": ["1.1"],
        "embeddings": ["0.0000020000"],
        "responses": ["0.5", "0.5000000003"],
    }
    for operation, costs in spent.items():
        for cost in costs:
            UsageRecordFactory(user=alice, created_at=at(4), operation=operation, cost=Decimal(cost))
    UsageRecordFactory(
        user=alice, created_at=at(4), operation="responses", provider_name="", model_name="gtp-typo", cost=Decimal(0)
    )

    summary = client.get("/api/usage/summary/").json()

    by_operation = {entry.pop("operation"): entry for entry in summary["by_operation"]}
    assert list(by_operation) == ["chat", "embeddings", "messages", "responses"]
    assert {name: (entry["requests"], entry["cost"]) for name, entry in by_operation.items()} == {
        "chat": (2, "0.2500000001"),
        "embeddings": (1, "0.0000020000"),
        "messages": (1, "1.1000000000"),
        "responses": (3, "1.0000000003"),
    }
    assert by_operation["responses"]["prompt_tokens"] == 30 and by_operation["responses"]["completion_tokens"] == 15
    assert sum(Decimal(entry["cost"]) for entry in by_operation.values()) == Decimal(summary["total"]["cost"])
    assert sum(entry["requests"] for entry in by_operation.values()) == summary["total"]["requests"] == 7
    assert [
        entry["operation"] for entry in client.get("/api/usage/summary/", {"model": "gtp-typo"}).json()["by_operation"]
    ] == ["responses"]


def test_summary_costs_are_exact_decimals(client, alice):
    for _ in range(3):
        UsageRecordFactory(user=alice, created_at=at(5), cost=Decimal("0.1000000001"))

    summary = client.get("/api/usage/summary/").json()

    assert summary["total"]["cost"] == "0.3000000003"
    assert summary["by_day"][0]["cost"] == "0.3000000003"
    assert summary["by_model"][0]["cost"] == "0.3000000003"


def test_summary_of_nothing_is_zero(client, ledger):
    summary = client.get("/api/usage/summary/", {"start": "2030-01-01"}).json()

    assert summary == {
        "total": {
            "requests": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "cache_write_1h_tokens": 0,
            "web_search_requests": 0,
            "cost": "0.0000000000",
        },
        "by_day": [],
        "by_model": [],
        "by_operation": [],
    }


def test_anonymous_callers_get_401():
    for path in ("/api/usage/", "/api/usage/summary/"):
        response = APIClient().get(path)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_summary_sums_prompt_cache_reads_and_writes(client, alice):
    # A user tuning prompt caching reads how much of their prompts came from the cache and how much was
    # written to it (priced apart from the rest), per day and model, as each row gives them.
    UsageRecordFactory(user=alice, created_at=at(5), model_name="claude-test", prompt_tokens=900, cached_tokens=600)
    UsageRecordFactory(
        user=alice, created_at=at(5), model_name="claude-test", prompt_tokens=1200, cache_write_tokens=1000
    )
    UsageRecordFactory(user=alice, created_at=at(6), model_name="gpt-test", prompt_tokens=50, cached_tokens=32)

    summary = client.get("/api/usage/summary/").json()

    assert (summary["total"]["cached_tokens"], summary["total"]["cache_write_tokens"]) == (632, 1000)
    assert [(d["day"], d["cached_tokens"], d["cache_write_tokens"]) for d in summary["by_day"]] == [
        ("2025-03-05", 600, 1000),
        ("2025-03-06", 32, 0),
    ]
    assert [(m["model"], m["cached_tokens"], m["cache_write_tokens"]) for m in summary["by_model"]] == [
        ("claude-test", 600, 1000),
        ("gpt-test", 32, 0),
    ]


def test_summary_sums_writes_to_the_1_hour_cache(client, alice):
    # Writes to Anthropic's 1-hour cache are priced apart from the 5-minute cache's: the summary says how many
    # of the cache writes went there, as each row does.
    UsageRecordFactory(
        user=alice, created_at=at(5), model_name="claude-test", cache_write_tokens=1000, cache_write_1h_tokens=700
    )
    UsageRecordFactory(
        user=alice, created_at=at(6), model_name="claude-test", cache_write_tokens=500, cache_write_1h_tokens=50
    )
    UsageRecordFactory(user=alice, created_at=at(6), model_name="gpt-test", cache_write_tokens=0)

    summary = client.get("/api/usage/summary/").json()

    assert (summary["total"]["cache_write_tokens"], summary["total"]["cache_write_1h_tokens"]) == (1500, 750)
    assert [(d["day"], d["cache_write_1h_tokens"]) for d in summary["by_day"]] == [
        ("2025-03-05", 700),
        ("2025-03-06", 50),
    ]
    assert [(m["model"], m["cache_write_1h_tokens"]) for m in summary["by_model"]] == [
        ("claude-test", 750),
        ("gpt-test", 0),
    ]
