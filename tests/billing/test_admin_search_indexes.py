"""The admin's search on the tables that grow with the users reads through indexes, on PostgreSQL: with 200,000
users and ledger rows and 50,000 rows in each other table, analyzed, no query a search runs reads one of those
tables whole (a sequential scan, or an index read end to end): ``LIKE '%…%'``, or Django's case-insensitive
``UPPER(…)`` on a column indexed as written, did (docs/ledger.md, "The admin at scale"). What a list reads at
every view, searched or not, is its own tests' matter.

PostgreSQL only (the suite's PostgreSQL phase runs tests/billing): SQLite's plans are another matter."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import ApiKey, BudgetAlert, BudgetCounter, UsageRecord, UserPlan
from billing.services.plans import plan_assign
from experiments.models import Feedback
from providers.models import ProviderCredential
from tests.factories import ProviderFactory, UserFactory

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's plans"),
]

User = get_user_model()
NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
# The tables a search must not read whole: a row (or several) a user, or a request.
BIG = (
    "auth_user",
    "billing_apikey",
    "billing_userplan",
    "billing_budgetalert",
    "billing_budgetcounter",
    "billing_usagerecord",
    "experiments_feedback",
    "providers_providercredential",
)


def clone(model, template, count: int, **columns: str) -> None:
    """``count`` copies of the row ``template`` of ``model``, made by the server (``generate_series``: ``i`` from 1),
    with ``columns`` set to SQL expressions of ``i``."""
    names = [field.column for field in model._meta.concrete_fields if not field.primary_key]
    table = connection.ops.quote_name(model._meta.db_table)
    values = [columns.get(name, connection.ops.quote_name(name)) for name in names]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(map(connection.ops.quote_name, names))}) "
            f"SELECT {', '.join(values)} FROM {table}, generate_series(1, %s) AS i WHERE {table}.id = %s",
            [count, template.pk],
        )


@pytest.fixture
def rows(plans):
    ada = UserFactory(username="ada", email="ada@example.com")
    base = UserFactory(username="someone", email="someone@example.com")
    clone(User, base, 200_000, username="'user' || i", email="'user' || i || '@example.com'")
    users = "(SELECT min(id) FROM auth_user WHERE username LIKE 'user%%') + i - 1"
    plan_assign(user=ada, plan=plans["Pro"])
    plan_assign(user=base, plan=plans["Pro"])
    clone(UserPlan, UserPlan.objects.get(user=base), 50_000, user_id=users)
    key = ApiKey.objects.create(user=ada, name="ci", prefix="sk-llmhub-AbCd1234", secret_hash="h" * 64)
    other = ApiKey.objects.create(user=base, name="ci", prefix="sk-llmhub-base", secret_hash="b" * 64)
    clone(ApiKey, other, 50_000, user_id=users, prefix="'sk-llmhub-' || i", secret_hash="md5(i::text)")
    alert = {"scope_kind": "user", "metric": "cost", "period": "monthly", "period_start": NOW, "threshold": 80}
    BudgetAlert.objects.create(scope_id=ada.pk, user=ada, limit=Decimal("10"), spent=Decimal("8"), **alert)
    template = BudgetAlert.objects.create(scope_id=base.pk, user=base, limit=Decimal("10"), spent=Decimal("8"), **alert)
    clone(BudgetAlert, template, 50_000, user_id=users, scope_id=users)
    counter = {"scope_kind": "user", "metric": "cost", "period": "monthly", "period_start": NOW, "spent": Decimal(8)}
    mine = BudgetCounter.objects.create(key=f"budget:user:{ada.pk}:cost:monthly:2026-12", scope_id=ada.pk, **counter)
    template = BudgetCounter.objects.create(key="budget:user:0:cost:monthly:2026-12", scope_id=0, **counter)
    clone(
        BudgetCounter,
        template,
        50_000,
        key="'budget:user:' || (i + 1000000) || ':cost:monthly:2026-12'",
        scope_id="i + 1000000",
    )
    UsageRecord.objects.create(request_id="req_abc123", user=ada, api_key=key, cost=Decimal("0.1"), duration_ms=1)
    template = UsageRecord.objects.create(request_id="req_0", user=base, cost=Decimal("0.1"), duration_ms=1)
    clone(UsageRecord, template, 200_000, request_id="'req_' || i", user_id=users)
    Feedback.objects.create(request_id="req_abc123", metric="thumbs", value=1, user=ada)
    template = Feedback.objects.create(request_id="req_0", metric="thumbs", value=1, user=base)
    clone(Feedback, template, 50_000, request_id="'req_' || i", user_id=users)
    provider = ProviderFactory(name="byo")
    ProviderCredential.objects.create(owner=ada, provider=provider, api_key="sk-ada-own-key-000")
    template = ProviderCredential.objects.create(owner=base, provider=provider, api_key="sk-base-own-key-000")
    clone(ProviderCredential, template, 50_000, owner_id=users)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return {"prefix": key.prefix, "counter": mine.key}


SEARCHES = [
    ("auth/user", "ada"),
    ("auth/user", "ADA@example.com"),
    ("billing/apikey", "ada@example.com"),
    ("billing/apikey", "prefix"),
    ("billing/userplan", "ada"),
    ("billing/budgetalert", "ada"),
    ("billing/budgetcounter", "counter"),
    ("billing/usagerecord", "req_abc123"),
    ("billing/usagerecord", "Ada"),
    ("experiments/feedback", "req_abc123"),
    ("experiments/feedback", "ada"),
    ("providers/providercredential", "ada@example.com"),
]


def test_every_search_finds_its_rows_through_indexes(admin_client, rows):
    whole_reads = []
    for page, term in SEARCHES:
        term = rows.get(term, term)
        # The search's own queries: not those the list runs at every view (its filters' choices, its counts).
        with CaptureQueriesContext(connection) as unsearched:
            admin_client.get(f"/admin/{page}/")
        every_view = {query["sql"] for query in unsearched.captured_queries}
        with CaptureQueriesContext(connection) as captured:
            answer = admin_client.get(f"/admin/{page}/", {"q": term})
        assert answer.status_code == 200
        assert answer.context["cl"].result_count == 1, (page, term)  # the search finds its row
        with connection.cursor() as cursor:
            for query in captured.captured_queries:
                sql = query["sql"]
                if sql in every_view or not sql.startswith("SELECT") or not any(f'"{table}"' in sql for table in BIG):
                    continue
                cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}")
                plan = cursor.fetchone()[0]
                plan = json.loads(plan) if isinstance(plan, str) else plan
                whole_reads += [f"{page} ?q={term}: {read}\n{sql}" for read in whole_table_reads(plan[0]["Plan"])]
    assert not whole_reads, "\n\n".join(whole_reads)


def whole_table_reads(node: dict) -> list[str]:
    """The plan's reads of a whole big table: a sequential scan, or an index scan with no condition on the index
    (every entry, in the index's order)."""
    found = []
    if node.get("Relation Name") in BIG:
        if node["Node Type"] == "Seq Scan" or (
            node["Node Type"] in ("Index Scan", "Index Only Scan") and "Index Cond" not in node
        ):
            found.append(f"{node['Node Type']} on {node['Relation Name']} {node.get('Index Name', '')}")
    for child in node.get("Plans", ()):
        found += whole_table_reads(child)
    return found
