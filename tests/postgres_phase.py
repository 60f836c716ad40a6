"""What the PostgreSQL phase of ``make test`` leaves to the SQLite phase (loaded there alone, by
``-p tests.postgres_phase`` in the Makefile's PYTEST_POSTGRES).

The phase runs the money tests a second time for what is PostgreSQL's own: the database budget store's row
locks, deferred foreign keys, migrations, storage settings, lock timeouts, the ledger's batched inserts, and
SQL that does date work. A test case that shows none of it there proves on PostgreSQL exactly what it proved on
SQLite a few minutes earlier, so it is deselected, each with its reason (the run's summary counts them):

- the Redis budget store's cases of the modules in REDIS_STORE_ELSEWHERE: their admission, settle and reconcile
  are atomic in Redis, the same whatever the database; their ``database`` twins (row locks) stay. A module
  whose Redis cases write the ledger through its writer, time out on a lock, spool rows or stop a server is not
  listed, and runs whole;
- all but one of a test's ``period_instants`` outside SQL_DATE_WORK: where the SQL is handed its instants as
  parameters and does no date arithmetic itself, the calendar is Python's, and the four instants ran on
  SQLite; one instant keeps the rows those tests write and read on PostgreSQL;
- tests of tests/billing that touch no database (formatters, pricing arithmetic on unsaved objects).
"""

from __future__ import annotations

from collections import Counter

import pytest

# The fixtures (or parameters) that choose a test's budget store: "redis" or "database".
STORE_PARAMETERS = ("store", "store_kind", "two_servers", "counters_store")

# Modules whose Redis-store cases prove nothing more on PostgreSQL than on SQLite: admission, settle and
# reconcile against Redis, the ledger rows read through the same ORM queries as their database twins.
REDIS_STORE_ELSEWHERE = {
    "tests/billing/test_budgets.py",
    "tests/billing/test_ratelimits.py",
    "tests/billing/test_reconcile_alerts.py",
    "tests/billing/test_alerts.py",
    # Two processes or servers on one Redis: what holds the budget there is Redis's atomicity. Their database
    # twins run here, where the counters' row locks hold it and the same ledger writer writes the same rows.
    "tests/billing/test_concurrency.py",
    "tests/billing/test_concurrency_operations.py",
}

# Modules whose SQL truncates or compares dates itself (TruncDate, TruncHour, Now()): the instant a test runs at
# reaches PostgreSQL's date functions and time zone, so all of its instants run here too.
SQL_DATE_WORK = {
    "tests/billing/test_dashboard.py",
    "tests/billing/test_rollups.py",
    "tests/billing/test_inflight_reservations.py",
}

# The instant kept where one is enough: the last second of a day, a month and a year at once.
KEPT_INSTANT = "last-second-of-year"

DATABASE_FIXTURES = frozenset(
    {"db", "transactional_db", "django_db_reset_sequences", "django_db_serialized_rollback", "live_server"}
)

REDIS_REASON = "Redis budget store: its atomicity is Redis's, whatever the database (ran on SQLite)"
INSTANT_REASON = f"one period instant ({KEPT_INSTANT}) is enough where the SQL does no date work (all ran on SQLite)"
NO_DATABASE_REASON = "touches no database (ran on SQLite)"

_deselected: Counter[str] = Counter()


def pytest_configure(config: pytest.Config) -> None:
    """A module named here that is not there (renamed, a typo) would silently run its instants or Redis cases
    once more, or lose them here: the run stops instead."""
    missing = sorted(m for m in REDIS_STORE_ELSEWHERE | SQL_DATE_WORK if not (config.rootpath / m).is_file())
    if missing:
        raise pytest.UsageError(f"tests/postgres_phase.py names modules that do not exist: {', '.join(missing)}")


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def _uses_database(item: pytest.Item) -> bool:
    return item.get_closest_marker("django_db") is not None or not DATABASE_FIXTURES.isdisjoint(item.fixturenames)


def _instant_elsewhere(item: pytest.Item, params: dict) -> bool:
    """Whether ``item`` runs at one of its test's several instants other than the one kept here."""
    # Imported here, not at the top: this plugin is loaded (``-p``) before pytest-django has configured Django, and
    # tests.conftest imports the project, which would then set it up under the development settings (SQLite's
    # db.sqlite3, Celery's file broker) for the whole run.
    from tests.conftest import PERIOD_INSTANTS

    marker = item.get_closest_marker("period_instants")
    if marker is None or "period_clock" not in params:
        return False
    names = list(marker.kwargs.get("only", PERIOD_INSTANTS))
    kept = KEPT_INSTANT if KEPT_INSTANT in names else names[0]
    return params["period_clock"] != PERIOD_INSTANTS[kept]


def why_not_on_postgres(item: pytest.Item) -> str | None:
    """The reason ``item`` proves nothing on PostgreSQL that it did not on SQLite; None if it runs here."""
    module = _module(item)
    params = getattr(getattr(item, "callspec", None), "params", {})
    if module.startswith("tests/billing/") and not _uses_database(item):
        return NO_DATABASE_REASON
    if module in REDIS_STORE_ELSEWHERE and any(params.get(name) == "redis" for name in STORE_PARAMETERS):
        return REDIS_REASON
    if module not in SQL_DATE_WORK and _instant_elsewhere(item, params):
        return INSTANT_REASON
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, deselected = [], []
    for item in items:
        reason = why_not_on_postgres(item)
        if reason is None:
            kept.append(item)
        else:
            deselected.append(item)
            _deselected[reason] += 1
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On a pytest-xdist worker: hand the counts to the controller, which collected nothing itself."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["postgres_phase_deselected"] = dict(_deselected)


def pytest_testnodedown(node, error) -> None:
    """On the controller: every worker collected the same tests, so each reports the same counts."""
    for reason, count in getattr(node, "workeroutput", {}).get("postgres_phase_deselected", {}).items():
        _deselected[reason] = count


def pytest_terminal_summary(terminalreporter) -> None:
    if _deselected:
        terminalreporter.section("left to the SQLite phase (tests/postgres_phase.py)")
        for reason, count in _deselected.most_common():
            terminalreporter.write_line(f"{count:5d}  {reason}")
