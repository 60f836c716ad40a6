"""Fixtures for the real components the tests talk to: the fake upstream, Redis, a live llmhub.

Each is started once per session (or per test where state matters) and talked to over real
sockets on the loopback interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import time_machine

from llmhub.testing.ports import free_port
from tests.waiting import What, _said

if TYPE_CHECKING:
    from llmhub.testing.postgres import PostgresCluster

__all__ = ["free_port"]  # the tests' servers take their ports from llmhub.testing.ports

# Bytecode is written, whatever the environment says: with this machine's (and the image's, Dockerfile)
# PYTHONDONTWRITEBYTECODE=1 no .pyc was left behind, so each pytest-xdist worker of each phase rewrote the
# asserts of every test module it collected and compiled them again (35 CPU-s to collect the suite, 16 s from
# the cache), and so did each server or command a test starts with this environment for the project's modules
# it imports. The workers and those processes inherit it; __pycache__ is ignored by git and by the image.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
pytest_plugins = ["tests.fixtures_upstreams", "tests.fixtures_webhook", "tests.fixtures_broker"]


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "period_instants(tick=False, only=names): run the test once at each of PERIOD_INSTANTS (or those named), "
        "with this process's clock pinned there (tick=True: started there and running); only=(): not at all, for a "
        "test of a module so marked that reads no clock",
    )
    _flush_retrying_deadlocks()
    from tests.database_template import template_owner_set

    template_owner_set(config)


def pytest_sessionfinish(session) -> None:
    """The controller of a pytest-xdist run removes the template its workers copied (tests/database_template.py)."""
    if not hasattr(session.config, "workerinput"):
        from pytest_django.plugin import blocking_manager_key

        from tests.database_template import templates_remove

        templates_remove(session.config.stash[blocking_manager_key])


# PERIODS AND CLOCKS
# Where calendar arithmetic goes wrong: a day or month that has just begun (nothing earlier in it), one about
# to end (everything earlier in it, the next one a second away), the end of a year, and a leap day. A test
# marked `period_instants` runs once at each, under these ids.
PERIOD_INSTANTS = {
    "first-second-of-month": datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC),
    "last-second-of-month": datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC),
    "last-second-of-year": datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC),
    "leap-day": datetime(2028, 2, 29, 12, 0, 0, tzinfo=UTC),
}


def python_argv(clock: datetime | None, module: str, *args: str) -> list[str]:
    """The command line of ``python -m module args``, with the process's clock pinned at ``clock`` (the
    ``period_clock`` of the test that starts it) when there is one."""
    if clock is None:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "tests.pinned_clock", clock.isoformat(), module, *args]


def pytest_generate_tests(metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("period_instants")
    if marker is not None and marker.kwargs.get("only", PERIOD_INSTANTS):
        names = marker.kwargs.get("only", PERIOD_INSTANTS)
        params = [pytest.param(PERIOD_INSTANTS[name], id=name) for name in names]
        metafunc.parametrize("period_clock", params, indirect=True)


@pytest.fixture(autouse=True)
def period_clock(request) -> Iterator[datetime | None]:
    """For a test marked ``period_instants``: the instant it runs at, with every wall clock of this process
    (``datetime.now``, ``timezone.now``, ``time.time``, a live server's thread) pinned there from before the
    test's other fixtures build their rows. Autouse so that it is set up first; None for other tests.

    Frozen by default: a test at 23:59:59 stays in that second however slow the machine is, so what it
    expects cannot move to the next day half-way. Sockets, asyncio and timeouts run on the monotonic
    clock, which time-machine leaves alone, so they keep working. Other processes are not pinned: a test
    starts them through ``python_argv`` to pin theirs at the same instant. Redis runs TTLs on its own
    clock, but only for durations; the instants in its data come from the processes that write them."""
    instant = getattr(request, "param", None)
    if instant is None:
        yield None
        return
    tick = request.node.get_closest_marker("period_instants").kwargs.get("tick", False)
    with time_machine.travel(instant, tick=tick):
        yield instant


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that pytest-timeout stopped while PostgreSQL was running its statement (waiting for a lock, most
    often) leaves that statement running: psycopg cancels one only on KeyboardInterrupt or SystemExit, and the
    timeout raises neither. Its backend kept every lock the test's transaction held, and each later test on
    that worker waited out its own timeout behind them (a CI run lost 11 tests so, each 120 s). So the
    report of such a test says what every session of its database was doing, and which blocked which; then
    those sessions end and the test's connection is closed (reopened by the next test), so that one test
    fails, not the rest of the worker's."""
    outcome = yield
    report = outcome.get_result()
    stopped = call.excinfo is not None and "from pytest-timeout" in str(call.excinfo.value)
    if stopped:
        said = _postgres_sessions_ended()
        if said:
            report.sections.append(("PostgreSQL when pytest-timeout stopped the test", said))


def _postgres_sessions_ended() -> str:
    """What the other sessions of this worker's PostgreSQL test database were doing (one line each: pid, state,
    what it waits for, the pids blocking it, its transaction's age, its statement), then those sessions
    terminated and this thread's connection closed. Empty on SQLite."""
    from django.db import connections

    lines: list[str] = []
    for connection in connections.all(initialized_only=True):
        if connection.vendor != "postgresql":
            continue
        import psycopg

        db = connection.settings_dict
        try:
            with psycopg.connect(
                host=db.get("HOST") or "127.0.0.1",
                port=db.get("PORT") or 5432,
                user=db.get("USER") or None,
                password=db.get("PASSWORD") or None,
                dbname=db["NAME"],
                autocommit=True,
                connect_timeout=10,
            ) as asking:
                others = "datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                rows = asking.execute(
                    "SELECT pid, state, wait_event_type, wait_event, pg_blocking_pids(pid), now() - xact_start,"
                    f" client_port, left(query, 300) FROM pg_stat_activity WHERE {others} ORDER BY pid"
                ).fetchall()
                lines += [" | ".join(map(str, row)) for row in rows]
                asking.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {others}")
        except psycopg.Error as exc:
            lines.append(f"not asked: {exc}")
        connection.close()  # inside the test's atomic block: Django rolls it back as closed, and reconnects
    return "\n".join(lines)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    """Before a test's fixtures are torn down (the database flush among them), the ledger rows it
    submitted on the test event loop are written: that loop does not run between tests, so its writer
    would otherwise write them during the next test, into that test's database."""
    from billing.services import ledger

    for loop, writer in list(ledger._writers.items()):
        if (writer.queue or writer.in_flight) and not loop.is_running() and not loop.is_closed():
            loop.run_until_complete(ledger.ledger_flush(wait_seconds=10))
    # Nor does a spool watcher a test started outlive it: tests share their event loop, and a watcher left
    # running would replay the next test's spool at its own pace (or, woken, at once) behind its back.
    for loop, (task, _) in list(ledger._spool_watchers.items()):
        if not task.done() and not loop.is_running() and not loop.is_closed():
            task.cancel()
            loop.run_until_complete(asyncio.gather(task, return_exceptions=True))


# What the flush after a transactional test leaves in place: Django's own flush deletes them too, then
# recreates every content type and permission through post_migrate, about 0.1 s a test (1,000 tests).
KEPT_BY_THE_FLUSH = frozenset({"django_content_type", "auth_permission"})


def _flush_retrying_deadlocks() -> None:
    """The flush that ends a transactional test: every table emptied as by ``manage.py flush``, except
    content types and permissions, which stay as migrations made them (no test changes them; a flush
    recreated them with new ids).

    On PostgreSQL the flush (``_empty_the_filled``: its tables locked, the filled ones emptied) can deadlock
    with work a test leaves running for a moment (a live server's ledger write, holding a table the flush waits
    for while it waits for one the flush holds); PostgreSQL then aborts the flush, and every later test would
    start on the previous one's rows. The other transaction commits, so the flush is tried again."""
    from django.core.management.color import no_style
    from django.db import DatabaseError, connections
    from django.test import testcases

    def flush(db_name: str) -> None:
        connection = connections[db_name]
        tables = connection.introspection.django_table_names(only_existing=True, include_views=False)
        tables = [table for table in tables if table not in KEPT_BY_THE_FLUSH]
        if connection.vendor == "postgresql":
            _empty_the_filled(connection, tables)
            return
        connection.ops.execute_sql_flush(connection.ops.sql_flush(no_style(), tables, allow_cascade=False))

    def _fixture_teardown(self) -> None:
        for db_name in self._databases_names(include_mirrors=False):
            for attempt in range(1, 6):
                try:
                    flush(db_name)
                    break
                except DatabaseError as exc:
                    if attempt == 5 or "deadlock detected" not in str(exc):
                        raise
                    time.sleep(0.2 * attempt)

    testcases.TransactionTestCase._fixture_teardown = _fixture_teardown


def _empty_the_filled(connection, tables: list[str]) -> None:
    """PostgreSQL's flush: the tables that hold rows emptied with DELETE, not every table truncated. A TRUNCATE of
    the 57 took 0.13 s (a new file for each table and each index), most of a short transactional test; a
    TRUNCATE of the few a test filled is no cheaper, as it must take every table that refers to them along
    (CASCADE: most tables refer to a user). The foreign keys are checked at the commit (Django makes them
    DEFERRABLE INITIALLY DEFERRED), when every row that referred to a deleted one is gone too. The tables are
    locked first (SHARE: no one writes until this commits), so a row another connection was writing is seen once
    it commits, and deleted, as the TRUNCATE waited for it and removed it."""
    from django.db import transaction

    quote = connection.ops.quote_name
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute(f"LOCK TABLE {', '.join(map(quote, tables))} IN SHARE MODE")
        cursor.execute(
            " UNION ALL ".join(f"SELECT %s WHERE EXISTS (SELECT FROM {quote(table)})" for table in tables), tables
        )
        filled = [table for (table,) in cursor.fetchall()]
        if filled:
            cursor.execute("; ".join(f"DELETE FROM {quote(table)}" for table in filled))


def database_url_for_subprocesses() -> str:
    """The URL of the database this test run uses (SQLite file or PostgreSQL), for the servers and
    workers a test starts in other processes (as their ``TEST_DATABASE_URL``)."""
    from urllib.parse import quote

    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    credentials = quote(db.get("USER") or "", safe="")
    if db.get("PASSWORD"):
        credentials += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{credentials}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


def process_stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``process``: SIGTERM, and SIGKILL if it has not ended ``grace`` seconds later (a server stuck in its
    start-up or its shutdown may never act on SIGTERM)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=grace)


class PortTakenError(RuntimeError):
    """The server a test started ended while another process listened on the port it was given (it lost the bind
    to a server of another test run on this machine): start it again on another port."""


def wait_for_port(port: int, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Until something listens on ``port``; with ``process`` (the server meant to listen there), until that
    process (or one it started) listens there, and failing at once, with its exit status, if it has ended instead
    of waiting out the timeout (``PortTakenError`` if another process held the port meanwhile). The timeout is
    generous: it costs nothing when the server starts, and a server process importing Django on a loaded 2-core
    machine took more than 15 s (the former default) in CI runs beside other work.

    Whose listener it is matters: ``free_port`` hands each xdist worker a band of ports, but every test run on
    the machine has a ``gw0`` of the same band, and in the seconds a server takes to import Django another run's
    server (a live server of tests/gateway binds at once) can take the port. This server then dies on "address
    already in use", and a wait that took any listener for it had the test send its requests to the other run's
    server, on another database: a key the test had just created got 401 "Incorrect API key", and the fake
    upstream never saw the requests (the PostgreSQL phase of tests/billing/test_inflight_reservations.py, once).

    Whenever the wait fails (the timeout, the process ended, the test interrupted), ``process`` is stopped
    (``process_stop``) before the failure goes on: the fixture that started it has not handed it to its
    teardown yet, and a server that never listened was left running for the rest of the session."""
    foreign: list[bool] = []

    def listens() -> bool:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return False
        if process is None:
            return True
        ours = _listens_in(port, process.pid)
        foreign[:] = [ours is False]
        return ours is not False

    try:
        wait_for_ready(process, listens, f"nothing listens on 127.0.0.1:{port}", timeout=timeout)
    except RuntimeError as exc:
        if foreign and foreign[0]:
            raise PortTakenError(f"{exc}; another process listens on 127.0.0.1:{port}") from None
        raise


def _listens_in(port: int, pid: int) -> bool | None:
    """Whether process ``pid`` or one of its descendants holds the socket listening on ``port`` (Linux's
    /proc); None where /proc does not say (another system, or the listener not found there)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    return _holds(pid, inodes) or any(_holds(member, inodes) for member in _process_tree(pid)[1:])


def _holds(pid: int, sockets: set[str]) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in sockets:
                return True
        except OSError:
            continue
    return False


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc's parent ids."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        member = todo.pop()
        tree.append(member)
        todo.extend(children.get(member, ()))
    return tree


def wait_for_ready(
    process: subprocess.Popen | None,
    ready: Callable[[], bool],
    what: What,
    timeout: float = 60.0,
    interval: float = 0.01,
) -> None:
    """Until ``ready()`` (a server listens, a worker says it consumes, …): ``TimeoutError`` (``what`` did not
    happen: a string, or a function that says it then, as ``tests.waiting`` takes it) after ``timeout`` seconds;
    with ``process``, ``RuntimeError`` at once, with its exit status, if it has ended first. Whenever the wait
    fails (also when the test is interrupted), ``process`` is stopped (``process_stop``): the start-or-stop guard
    of every process a test starts and waits for."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.args!r} ended with status {process.returncode}: {_said(what)}")
            time.sleep(interval)
        raise TimeoutError(_said(what))
    except BaseException:
        if process is not None:
            process_stop(process)
        raise


@pytest.fixture
def sqlite_variable_limit() -> Iterator[None]:
    """SQLite's limit of variables a statement pinned at 999 (builds older than 3.32): a few thousand rows then do
    what 32,767 do on upstream's build (32,766) and 250,001 on Debian's. PostgreSQL's protocol takes 65,535 (past
    them, an admin's confirmation page alone, listing every row as Django does, outlasts a test's timeout): there
    the same rows check the batches' result."""
    import sqlite3

    from django.db import connection

    if connection.vendor != "sqlite":
        yield
        return
    connection.ensure_connection()
    before = connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    yield
    connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, before)


@pytest.fixture(autouse=True)
def _empty_ledger_spool():
    """Every test starts with this process's ledger spool empty: a row an earlier test left there (its
    database rolled back under it) would otherwise be replayed into this test's ledger by a live server's
    start-up. Tests that study the spool give it a path of their own or fill it themselves."""
    from billing.services.spool import CLAIMED_INFIX, spool_path

    path = spool_path()
    for leftover in [path, *path.parent.glob(path.name + CLAIMED_INFIX + "*")]:
        leftover.unlink(missing_ok=True)
    yield


@pytest.fixture(autouse=True)
def _no_request_bound():
    """A test starts outside any request: a synchronous test that made a request id (``new_request_id``
    binds it for the log lines that follow, as a request's task does) would leave it bound in the main
    thread for every later test's log lines."""
    from core.request_context import request_id_var

    request_id_var.set(None)
    yield


@pytest.fixture(autouse=True)
def _celery_app_kept_current():
    """A test that makes another Celery app (``Celery(...)`` is made current by default) must not leave it
    current: every ``shared_task`` proxy would then send to that app's broker instead of running eagerly,
    and a later test of this worker waits on a result that has no backend, or finds no email its task
    should have sent. The app is put back and the test that left it fails here, not the later one."""
    from celery import current_app

    from llmhub.celery import app

    yield
    left = current_app._get_current_object()
    if left is not app:
        app.set_current()
        pytest.fail(f"the test left another Celery app current ({left!r}); make it with set_as_current=False")


@pytest.fixture(autouse=True)
def _fresh_lookup_caches():
    """In-process lookup caches outlive a test's database rows, whose ids are reused once the database is
    emptied (a user's plan limits cached for the last test's user of that id answered for this one's):
    start every test without them, every ``TTLCache`` alike."""
    from billing.services.inflight import held_clear
    from billing.services.ledger_rows import last_used_forget_local
    from billing.services.ratelimits import local_rate_limiter
    from core.cache import lookup_caches_invalidate
    from llmhub.schema_view import schema_documents_forget
    from providers.routing.breakers import breakers_forget_local
    from providers.routing.stats import stats_forget_local

    lookup_caches_invalidate()
    schema_documents_forget()  # the OpenAPI document of the last test's settings
    breakers_forget_local()  # deployment ids are reused once the database is emptied
    stats_forget_local()  # so are their latencies, in-flight and per-minute counts
    last_used_forget_local()  # and the keys' ids, whose first use in a test would not be written
    local_rate_limiter.clear()  # and the users' and keys' ids, whose rate windows would be full already
    yield
    lookup_caches_invalidate()
    local_rate_limiter.clear()
    held_clear()  # a test's unsettled admissions must not be re-asserted into the next test's Redis


@pytest.fixture(autouse=True)
def _empty_django_cache():
    """Django's cache (in memory here) outlives a test: the sign-in throttle's failure counts, the
    once-per-token sign-in events and the per-minute limit of refusal events (audit), the provider-key
    checks' throttle of a user whose id the next test reuses. Left there, a later test's failed sign-in
    from the same address in the same minute was not recorded, or its sign-in was throttled: every test
    starts with it empty (tests/accounts did; the others did not)."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture(scope="session", autouse=True)
async def _provider_clients_closed_at_the_end():
    """The provider clients pooled on the session's event loop are closed when the session ends, as the
    server's lifespan closes its own at shutdown (``adapters_close_all``). Left open, each aiohttp session
    logged "Unclosed client session" with a traceback at the worker's exit."""
    yield
    from providers.adapters.registry import adapters_close_all

    await adapters_close_all()


@pytest.fixture(scope="session")
def django_db_setup(
    request,
    django_test_environment,
    django_db_blocker,
    django_db_use_migrations,
    django_db_keepdb,
    django_db_createdb,
    django_db_modify_db_settings,
):
    """pytest-django's, except that a pytest-xdist worker's database is a copy of one its run migrated once
    (tests/database_template.py) rather than migrated by each worker."""
    from django.test.utils import setup_databases, teardown_databases
    from pytest_django.fixtures import _disable_migrations, _get_databases_for_setup

    from tests.database_template import databases_from_template, template_owner

    keepdb = django_db_keepdb and not django_db_createdb
    if not django_db_use_migrations:
        _disable_migrations()
    aliases, serialized_aliases = _get_databases_for_setup(request.session.items)
    verbosity = request.config.option.verbose
    owner = template_owner(request.config)
    with django_db_blocker.unblock():
        db_cfg = None
        if owner is not None and django_db_use_migrations and not keepdb:
            db_cfg = databases_from_template(owner, aliases, serialized_aliases, verbosity)
        if db_cfg is None:
            db_cfg = setup_databases(
                verbosity=verbosity,
                interactive=False,
                aliases=aliases,
                serialized_aliases=serialized_aliases,
                keepdb=keepdb,
            )
    yield
    if not django_db_keepdb:
        with django_db_blocker.unblock():
            try:
                teardown_databases(db_cfg, verbosity=verbosity)
            except Exception as exc:
                request.node.warn(pytest.PytestWarning(f"Error when trying to teardown test databases: {exc!r}"))


@pytest.fixture(scope="session", autouse=True)
def _test_database_released_at_the_end(django_db_setup, django_db_blocker):
    """Before pytest-django drops a PostgreSQL test database, the sessions still open on it are ended: the
    ledger's writer thread and the live servers' threads of this process keep their connections for their
    lifetime (as in production), and PostgreSQL refuses to drop a database in use ("Error when trying to
    teardown test databases ... being accessed by other users")."""
    yield
    from django.db import connections

    with django_db_blocker.unblock():
        for alias in connections:
            connection = connections[alias]
            if connection.vendor != "postgresql":
                continue
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def fake_upstream_server():
    """The fake provider server, shared by the session; use ``fake_upstream`` for a clean one."""
    from llmhub.testing.fake_upstream import FakeUpstream

    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def fake_upstream(fake_upstream_server):
    """The fake upstream with its counters and request log reset for this test."""
    fake_upstream_server.reset()
    return fake_upstream_server


def redis_start(argv: list[str], port: int) -> subprocess.Popen | None:
    """Start redis-server (``argv``, which names ``port``) and make sure that what answers on the port is
    this process; None, with nothing left running, if another process holds the port.

    A port handed out by the kernel could be taken by another process's connection or server in the
    instant before the bind: the redis-server that loses the bind exits, and its test would talk to the
    other's server, and lose it when that test stops its own (the session's Redis of one worker once
    vanished that way). ``free_port`` now hands out ports no connection or other worker takes; this check
    stays, for whatever else may hold a port."""
    import redis

    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=process)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            answering = int(client.info("server")["process_id"])
        finally:
            client.close()
        if process.poll() is None and answering == process.pid:
            return process
    except (TimeoutError, RuntimeError, redis.RedisError):
        pass
    process_stop(process)
    return None


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen]]:
    """A real redis-server on a free port, without persistence: its URL and process (a test may stop it).
    Skipped only outside CI (``.ci/run`` installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run must install it")
        pytest.skip("redis-server is not installed")
    for _attempt in range(5):
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = redis_start(argv, port)
        if process is not None:
            break
    else:
        pytest.fail("no free port for a redis-server after 5 tries")
    try:
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process_stop(process)


class _SessionRedis:
    """The session's redis-server, started again on its port if it is found gone before a test."""

    def __init__(self, url: str, process: subprocess.Popen) -> None:
        self.url, self.process = url, process
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])
        self.argv = [str(part) for part in process.args]

    def ensure(self, nodeid: str) -> None:
        if self.process.poll() is None:
            return
        import warnings

        warnings.warn(
            f"the session's redis-server on port {self.port} was gone (status {self.process.returncode}) "
            f"before {nodeid}; started again there",
            stacklevel=1,
        )
        process = redis_start(self.argv, self.port)
        if process is None:
            pytest.fail(f"the session's redis-server is gone and port {self.port} is taken")
        self.process = process


_session_redis: _SessionRedis | None = None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The session's redis-server (``redis_server``)."""
    global _session_redis
    with redis_server() as (url, process):
        _session_redis = _SessionRedis(url, process)
        try:
            yield url
        finally:
            held, _session_redis = _session_redis, None
            if held.process is not process and held.process.poll() is None:
                held.process.terminate()
                held.process.wait(timeout=10)


@pytest.fixture(autouse=True)
def _session_redis_alive(request) -> None:
    """A test that finds the session's redis-server gone (it happened in CI, most likely a port handed to two
    servers at once, which ``free_port`` no longer does) gets it started again on the same port, with a
    warning naming the test. Asks for no fixture: the order in
    which the others are set up stays as it was."""
    if _session_redis is not None:
        _session_redis.ensure(request.node.nodeid)


@functools.cache
def _promptly_stopped_server_class():
    import uvicorn

    class PromptlyStoppedServer(uvicorn.Server):
        """uvicorn's server, whose ``exit_now`` starts its shutdown at once: uvicorn looks at ``should_exit`` only
        every 0.1 s (``main_loop``), up to 0.1 s (0.05 on average) of the teardown of every test with a live server,
        1,700 in tests/gateway alone. The shutdown itself (uvicorn's, then the lifespan's ledger drain) is
        unchanged."""

        _woken: asyncio.Event | None = None
        _loop: asyncio.AbstractEventLoop | None = None

        async def main_loop(self) -> None:
            self._loop, self._woken = asyncio.get_running_loop(), asyncio.Event()
            counter = 0
            while not await self.on_tick(counter):
                counter = (counter + 1) % 864000
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), 0.1)

        def exit_now(self) -> None:
            """From any thread: ``should_exit``, and the main loop woken to see it (else at its next tick)."""
            self.should_exit = True
            loop, woken = self._loop, self._woken
            if loop is not None and woken is not None:
                with contextlib.suppress(RuntimeError):  # the loop has ended already
                    loop.call_soon_threadsafe(woken.set)

    return PromptlyStoppedServer


class LiveServer:
    """llmhub's ASGI application served by uvicorn in a thread of this process, on a real port.

    ``static_files`` serves the apps' static files as ``make run`` does (tests run with DEBUG off), for
    pages a browser loads. ``ws_ping_seconds`` replaces uvicorn's WebSocket keepalive (a ping every 20 s, the
    peer given 20 s to answer) with a ping every that many seconds, answered within as many, for tests of a
    peer that stops answering."""

    def __init__(self, *, static_files: bool = False, ws_ping_seconds: float | None = None) -> None:
        self.static_files = static_files
        self.ws_ping = (
            {} if ws_ping_seconds is None else {"ws_ping_interval": ws_ping_seconds, "ws_ping_timeout": ws_ping_seconds}
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> LiveServer:
        import uvicorn
        from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

        from llmhub.asgi import application

        app = ASGIStaticFilesHandler(application) if self.static_files else application
        # No log_config: uvicorn's own (dictConfig) would close every handler of the process, pytest's log
        # file among them, which then wrote nothing for the rest of the session. Its loggers propagate instead.
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", log_config=None, lifespan="on", **self.ws_ping
        )
        self._server = _promptly_stopped_server_class()(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)
        self._thread.start()
        try:
            wait_for_port(self.port)
        except BaseException:
            self.stop()  # a server that never listened must not serve (or keep starting) behind later tests
            raise
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.exit_now()
        if self._thread is not None:
            self._thread.join(timeout=15)


@pytest.fixture
def llmhub_server(transactional_db) -> Iterator[LiveServer]:
    """A live llmhub for SDK and WebSocket clients. Tests using it see committed data only."""
    server = LiveServer().start()
    yield server
    server.stop()


@pytest.fixture
def live_site(transactional_db) -> Iterator[LiveServer]:
    """A live llmhub serving its pages with their static files, for a browser."""
    server = LiveServer(static_files=True).start()
    yield server
    server.stop()


CHROMIUM = "/usr/bin/chromium"
# No background networking: this machine has no network, and Chromium's own connections would fail.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class CspWatchedBrowser:
    """A Playwright ``Browser`` whose every page reports what the Content-Security-Policy refused (Chromium
    writes each refusal to the console as an error): ``csp_violations``, which the autouse fixture
    ``_no_csp_violations`` requires empty after each test. A test that expects a refusal takes it with
    ``take_csp_violations()``."""

    def __init__(self, browser) -> None:
        self._browser = browser
        self.csp_violations: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self._browser, name)

    def watch(self, page) -> None:
        def seen(message) -> None:
            if message.type == "error" and "Content Security Policy" in message.text:
                self.csp_violations.append(f"{page.url}: {message.text}")

        page.on("console", seen)

    async def new_context(self, **kwargs):
        context = await self._browser.new_context(**kwargs)
        context.on("page", self.watch)
        return context

    async def new_page(self, **kwargs):
        page = await self._browser.new_page(**kwargs)
        self.watch(page)
        return page

    def take_csp_violations(self) -> list[str]:
        taken, self.csp_violations = self.csp_violations, []
        return taken


@pytest.fixture(scope="module")
async def browser():
    """Debian's Chromium driven by Playwright (never a browser build Playwright would download), its pages
    watched for Content-Security-Policy refusals (CspWatchedBrowser)."""
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed; .ci/run must install it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield CspWatchedBrowser(launched)
        await launched.close()


@pytest.fixture(autouse=True)
def _no_csp_violations(request) -> Iterator[None]:
    """A browser test fails when a page it opened broke the Content-Security-Policy (core/csp.py): an
    inline script or style, or a request to another origin, that the pages must not need."""
    if "browser" not in request.fixturenames:
        yield
        return
    watched = request.getfixturevalue("browser")
    watched.take_csp_violations()  # a previous test's, in the same module, are that test's failure
    yield
    violations = watched.take_csp_violations()
    assert not violations, "Content-Security-Policy violations:\n" + "\n".join(violations)


@contextlib.contextmanager
def own_postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL of the test's own, its database created, which the test may stop and start again
    (the suite's database cannot be taken away from under it). Skipped without PostgreSQL, except in CI."""
    from llmhub.testing.postgres import PostgresCluster, PostgresUnavailable, createdb

    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}; .ci/run must install it")
        pytest.skip(str(exc))
    try:
        try:
            cluster.init()
            cluster.start()
            createdb(cluster.url)
        except (subprocess.CalledProcessError, PostgresUnavailable) as exc:
            pytest.fail(f"could not start PostgreSQL: {exc}")
        yield cluster
    finally:
        cluster.remove()
