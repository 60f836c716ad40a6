"""Cost rollups: ``DailyUsage`` always equals the ledger summed per day, user, key, provider, model and operation,
however often the rollup runs and whenever late ledger rows arrive."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine

from billing.models import DailyUsage, DailyUsageMark, DailyUsageScanMark, UsageRecord
from billing.services.rollups import daily_rollups_derive, daily_usage_rebuild, daily_usage_rebuild_recent
from billing.tasks import usage_rollup
from tests.billing.rollup_ledger import TODAY, YESTERDAY, at, ledger_per, rollup_rows
from tests.factories import UsageRecordFactory

pytestmark = pytest.mark.django_db

# What DailyUsage rolls up by, besides the day.
GROUP = ("user_id", "api_key_id", "provider_name", "model_name", "operation")


def raw() -> dict:
    """The ledger per (day, user, key, provider, model, operation) (``ledger_per``)."""
    return ledger_per(*GROUP)


def rolled() -> dict:
    """DailyUsage's rows, as ``raw`` gives the ledger's (``rollup_rows``)."""
    return rollup_rows(DailyUsage, *GROUP)


def test_rollup_equals_the_ledger_and_running_twice_changes_nothing(rollup_ledger):
    # A second row of bob's key today, on the same provider, model and operation: one rollup row sums both.
    UsageRecordFactory(
        user=rollup_ledger["bob"],
        api_key=rollup_ledger["home"],
        created_at=at(TODAY, 5),
        cost=Decimal("3"),
        completion_tokens=2000,
    )
    assert daily_usage_rebuild_recent(days=2, today=TODAY) == 8
    first = rolled()
    assert first == raw()

    daily_usage_rebuild_recent(days=2, today=TODAY)
    assert rolled() == first
    assert DailyUsage.objects.count() == 8
    bob_today = DailyUsage.objects.get(day=TODAY, api_key=rollup_ledger["home"])
    assert (bob_today.requests, bob_today.prompt_tokens, bob_today.completion_tokens, bob_today.cost) == (
        2,
        1010,
        2005,
        Decimal("5"),
    )


def test_a_late_ledger_row_is_counted_on_the_next_run(rollup_ledger):
    daily_usage_rebuild_recent(days=2, today=TODAY)

    # A row for yesterday evening, written after the rollup ran (e.g. replayed from the spool).
    UsageRecordFactory(
        user=rollup_ledger["alice"],
        api_key=rollup_ledger["work"],
        created_at=at(YESTERDAY, 22),
        cost=Decimal("0.0000000007"),
    )
    assert rolled() != raw()

    daily_usage_rebuild_recent(days=2, today=TODAY)
    assert rolled() == raw()
    work_yesterday = DailyUsage.objects.get(day=YESTERDAY, api_key=rollup_ledger["work"])
    assert (work_yesterday.requests, work_yesterday.cost) == (2, Decimal("0.0015000008"))


def test_a_day_with_nothing_left_in_the_ledger_is_emptied(rollup_ledger):
    daily_usage_rebuild(day=TODAY)
    UsageRecord.objects.filter(created_at__date=TODAY).delete()
    assert daily_usage_rebuild(day=TODAY) == 0
    assert not DailyUsage.objects.filter(day=TODAY).exists()


@pytest.mark.period_instants
def test_the_beat_task_rolls_up_today_and_yesterday(rollup_ledger, settings):
    now = datetime.now(UTC)
    UsageRecordFactory(user=rollup_ledger["bob"], created_at=now, cost=Decimal("0.75"))
    UsageRecordFactory(user=rollup_ledger["bob"], created_at=now - timedelta(days=1), cost=Decimal("0.5"))
    UsageRecordFactory(user=rollup_ledger["bob"], created_at=now - timedelta(days=2), cost=Decimal("9"))

    usage_rollup.delay()

    assert sorted(DailyUsage.objects.values_list("day", "cost")) == [
        ((now - timedelta(days=1)).date(), Decimal("0.5")),
        (now.date(), Decimal("0.75")),
    ]


def test_a_late_row_of_a_day_the_task_no_longer_rebuilds_is_counted_on_the_next_run(rollup_ledger):
    """A spool replayed after an outage of days, or the lost-request sweep, writes rows with the time they
    were made: such a row lands on a day the task stopped rebuilding. The next run rolls that day up again,
    so the usage pages (which read past days from the rollup) count it."""
    from billing.selectors import usage_daily

    three_days_ago = TODAY - timedelta(days=3)
    UsageRecordFactory(user=rollup_ledger["bob"], created_at=at(three_days_ago, 9), cost=Decimal("4"))
    with time_machine.travel(at(three_days_ago, 23), tick=False):
        usage_rollup.delay()
    with time_machine.travel(at(TODAY, 6), tick=False):
        usage_rollup.delay()
        UsageRecordFactory(user=rollup_ledger["bob"], created_at=at(three_days_ago, 10), cost=Decimal("0.0000000001"))
    with time_machine.travel(at(TODAY, 6) + timedelta(minutes=10), tick=False):
        usage_rollup.delay()
        spent = {day.day: day.cost for day in usage_daily(days=30, today=TODAY, user_id=rollup_ledger["bob"].pk)}

    assert rolled() == raw()
    assert spent[three_days_ago] == Decimal("4.0000000001")
    # Nothing else was rolled up meanwhile: the days the task never saw rows of stay as they were.
    assert set(DailyUsage.objects.values_list("day", flat=True)) == {TODAY, YESTERDAY, three_days_ago}


def test_the_days_a_late_row_reopens_are_found_once(rollup_ledger):
    """The run after the one that rolled a late row's day up again does not roll that day up again."""
    three_days_ago = TODAY - timedelta(days=3)
    with time_machine.travel(at(TODAY, 6), tick=False):
        usage_rollup.delay()
        UsageRecordFactory(user=rollup_ledger["bob"], created_at=at(three_days_ago, 10), cost=Decimal("1"))
        usage_rollup.delay()
    first = DailyUsageMark.objects.get(day=three_days_ago).rebuilt_at
    with time_machine.travel(at(TODAY, 6) + timedelta(minutes=10), tick=False):
        usage_rollup.delay()

    assert DailyUsageMark.objects.get(day=three_days_ago).rebuilt_at == first
    assert DailyUsage.objects.get(day=three_days_ago).cost == Decimal("1")


def test_a_late_row_written_before_the_first_look_for_late_rows_is_counted(rollup_ledger):
    """The first run that looks for late rows (no ``DailyUsageScanMark`` yet: the first after migration 0024)
    looks from the previous run's high water, not from the marks it has just moved itself by rebuilding today."""
    three_days_ago = TODAY - timedelta(days=3)
    with time_machine.travel(at(TODAY, 6), tick=False):
        usage_rollup.delay()
    DailyUsageScanMark.objects.all().delete()  # as the task left things before it looked for late rows
    UsageRecordFactory(user=rollup_ledger["bob"], created_at=at(three_days_ago, 10), cost=Decimal("0.0000000001"))

    with time_machine.travel(at(TODAY, 6) + timedelta(minutes=10), tick=False):
        usage_rollup.delay()

    assert rolled() == raw()
    assert DailyUsage.objects.get(day=three_days_ago).cost == Decimal("0.0000000001")


def test_the_rollup_keeps_each_days_prompt_cache_writes_and_the_admin_shows_them(rollup_ledger, admin_client):
    """The ledger's rows say how many prompt tokens each request wrote to the provider's cache, which its cost
    prices apart; the day's rollup (all that is left of a day once retention has deleted its rows) sums them per
    model as it does the cached reads, and the rollup's page in the admin shows them."""
    from django.urls import reverse

    UsageRecordFactory(
        user=rollup_ledger["alice"],
        created_at=at(TODAY, 5),
        model_name="claude-test",
        provider_name="fake-anthropic",
        prompt_tokens=3000,
        cached_tokens=1000,
        cache_write_tokens=1500,
    )
    UsageRecordFactory(
        user=rollup_ledger["alice"],
        created_at=at(TODAY, 6),
        model_name="claude-test",
        provider_name="fake-anthropic",
        prompt_tokens=2500,
        cache_write_tokens=2048,
    )
    with time_machine.travel(at(TODAY, 7), tick=False):
        usage_rollup.delay()

    today = DailyUsage.objects.get(day=TODAY, model_name="claude-test")
    assert (today.requests, today.prompt_tokens, today.cached_tokens, today.cache_write_tokens) == (2, 5500, 1000, 3548)
    assert DailyUsage.objects.get(day=YESTERDAY, model_name="claude-test").cache_write_tokens == 6
    page = admin_client.get(reverse("admin:billing_dailyusage_change", args=[today.pk])).content.decode()
    assert "Cache write tokens" in page and "3548" in page


def test_the_rollup_keeps_each_days_writes_to_the_1_hour_cache_and_shows_them(rollup_ledger, admin_client):
    """Writes to Anthropic's 1-hour cache cost more than the 5-minute cache's: the ledger row keeps how many
    of its cache writes went there. The day's rollup (all that is left once retention has deleted the rows)
    summed the cache writes but not that part of them; it now does, and its page in the admin shows it."""
    from django.urls import reverse

    for hour, written, written_1h in ((5, 1500, 1000), (6, 2048, 48), (7, 300, 0)):
        UsageRecordFactory(
            user=rollup_ledger["alice"],
            created_at=at(TODAY, hour),
            model_name="claude-test",
            provider_name="fake-anthropic",
            prompt_tokens=3000,
            cache_write_tokens=written,
            cache_write_1h_tokens=written_1h,
        )
    with time_machine.travel(at(TODAY, 8), tick=False):
        usage_rollup.delay()
        usage_rollup.delay()  # rebuilt, not added to

    today = DailyUsage.objects.get(day=TODAY, model_name="claude-test")
    assert (today.requests, today.cache_write_tokens, today.cache_write_1h_tokens) == (3, 3848, 1048)
    assert DailyUsage.objects.get(day=YESTERDAY, model_name="claude-test").cache_write_1h_tokens == 4
    page = admin_client.get(reverse("admin:billing_dailyusage_change", args=[today.pk])).content.decode()
    assert "Cache write 1h tokens" in page and "1048" in page


def test_the_rollups_count_each_days_web_searches_and_a_rerun_gives_the_same(rollup_ledger):
    """The ledger row counts the web searches a provider billed apart from the tokens (``web_search_requests``);
    the rollups, all that is left of a day once retention has deleted its rows, summed their cost but not how many
    there were. Each rollup now sums them, and rolling up twice gives the same figures."""
    from billing.models import DailyStaffUsage, DailyUserUsage

    for hour, searches, cost in ((5, 2, "0.0200001"), (6, 5, "0.0500002")):
        UsageRecordFactory(
            user=rollup_ledger["alice"],
            created_at=at(TODAY, hour),
            operation="messages",
            model_name="claude-test",
            provider_name="fake-anthropic",
            web_search_requests=searches,
            cost=Decimal(cost),
        )

    def figures() -> tuple:
        claude = DailyUsage.objects.get(day=TODAY, model_name="claude-test")
        staff = DailyStaffUsage.objects.get(day=TODAY, model_name="claude-test")
        alice = DailyUserUsage.objects.get(day=TODAY, user=rollup_ledger["alice"])
        return (
            (claude.requests, claude.web_search_requests, claude.cost),
            (staff.requests, staff.web_search_requests, staff.cost),
            (alice.requests, alice.web_search_requests, alice.cost),
            DailyStaffUsage.objects.get(day=YESTERDAY, model_name="claude-test").web_search_requests,
            sum(DailyUserUsage.objects.filter(day=TODAY).values_list("web_search_requests", flat=True)),
        )

    with time_machine.travel(at(TODAY, 8), tick=False):
        usage_rollup.delay()
        first = figures()
        usage_rollup.delay()  # rebuilt, not added to
    assert (
        figures()
        == first
        == (
            (2, 7, Decimal("0.0700003")),
            (2, 7, Decimal("0.0700003")),
            (3, 7, Decimal("0.0700003003")),  # and her embeddings row of today, $0.0000000003
            3,  # yesterday's Claude row
            8,  # and bob's chat completion of today, 1 search
        )
    )
    assert rolled() == raw()


def test_the_rollup_keeps_each_operation_apart_and_equals_the_ledger_per_operation(rollup_ledger):
    """An operator could not tell from the usage pages how much of the spend went to the Responses API, chat
    completions, embeddings or the Messages API: the rollup summed the operations of a model together. It now
    keeps one row per operation, each equal to the ledger's rows of it, and a rerun changes nothing."""
    from billing.selectors import usage_breakdown

    for operation, cost in (("responses", "0.5"), ("responses", "0.0000000002"), ("embeddings", "0.01")):
        UsageRecordFactory(
            user=rollup_ledger["bob"],
            created_at=at(TODAY, 5),
            operation=operation,
            model_name="gpt-test",
            cost=Decimal(cost),
        )
    UsageRecordFactory(user=rollup_ledger["bob"], created_at=at(TODAY, 6), operation="messages", cost=Decimal("0.25"))

    def per_operation(rows) -> dict:
        out: dict = defaultdict(lambda: [0, Decimal(0)])
        for day, operation, requests, cost in rows:
            out[(day, operation)][0] += requests
            out[(day, operation)][1] += cost
        return dict(out)

    ledger_rows = [
        (r.created_at.astimezone(UTC).date(), r.operation, 1, r.cost)
        for r in UsageRecord.objects.filter(created_at__gte=at(YESTERDAY, 0))
    ]
    for _run in range(2):
        daily_usage_rebuild_recent(days=2, today=TODAY)
        rolled_per_operation = per_operation(DailyUsage.objects.values_list("day", "operation", "requests", "cost"))
        assert rolled_per_operation == per_operation(ledger_rows)
    assert rolled_per_operation[(TODAY, "responses")] == [2, Decimal("0.5000000002")]
    assert rolled_per_operation[(TODAY, "embeddings")] == [2, Decimal("0.0100000003")]
    assert rolled() == raw()

    UsageRecord.objects.filter(created_at__lt=at(TODAY, 0)).delete()  # yesterday read from its rollup alone
    with time_machine.travel(at(TODAY, 23), tick=False):
        shares = {s.label: (s.requests, s.cost) for s in usage_breakdown(by="operation", days=30, today=TODAY)}
    assert shares == {
        "Chat completion": (5, Decimal("2.7515000001")),
        "OpenAI responses": (3, Decimal("2.0000000002")),
        "Anthropic messages": (2, Decimal("1.35")),
        "Embeddings": (2, Decimal("0.0100000003")),
    }


def test_rollup_rows_from_before_the_operation_was_kept_read_as_unknown_until_their_day_is_rebuilt(
    rollup_ledger, admin_client
):
    """Rows rolled up before ``DailyUsage`` had the column get it empty (the migration's ``db_default``): their
    figures stay whole under "(unknown)", and a rebuild of the day (the task's for today and yesterday, the
    admin's for older days whose ledger rows are still there) files them under their operations."""
    from billing.selectors import usage_breakdown

    UsageRecordFactory(user=rollup_ledger["bob"], created_at=at(TODAY, 5), operation="responses", cost=Decimal("1"))
    daily_usage_rebuild_recent(days=2, today=TODAY)
    DailyUsage.objects.update(operation="")  # as the migration leaves the rows rolled up before it
    for day in (YESTERDAY, TODAY):  # and the rollups derived from them (migrations 0038, 0040)
        daily_rollups_derive(day)

    def shares() -> dict:
        return {s.label: (s.requests, s.cost) for s in usage_breakdown(by="operation", days=30, today=TODAY)}

    assert shares() == {"(unknown)": (9, Decimal("6.3515000004"))}
    daily_usage_rebuild(day=YESTERDAY)
    daily_usage_rebuild(day=TODAY)
    assert shares() == {
        "Chat completion": (5, Decimal("2.7515000001")),
        "OpenAI responses": (2, Decimal("2.5")),
        "Anthropic messages": (1, Decimal("1.1")),
        "Embeddings": (1, Decimal("0.0000000003")),
    }
    listed = admin_client.get("/admin/billing/dailyusage/", {"operation": "responses"}).content.decode()
    assert "OpenAI responses" in listed and "2 daily usage" in listed.replace("\n", " ")
