"""Ledger rows spooled while the database was down reach the ledger without Celery and without a restart,
and no budget counter forgets them meanwhile.

End to end: a PostgreSQL cluster of the test's own (stopped and started under a live server process, so it
cannot be the suite's database), Redis, and llmhub under a steady load. Service level: reconciliation and
the rebuild of a counter with rows in the spool.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis
import time_machine
import yaml
from asgiref.sync import async_to_sync
from django.utils import timezone

from billing.models import BudgetPeriod, UsageRecord
from billing.services import ledger
from billing.services.admission import admission_acquire, admission_settle
from billing.services.budgets import SETTLED_MEMORY, CounterRef, api_key_limits_set, period_bounds
from billing.services.counters import budget_counters_reconcile, counter_state
from billing.services.keys import api_key_create
from billing.services.ledger_rows import UsageData
from llmhub.testing.postgres import PostgresCluster
from providers.selectors import resolved_model
from tests.conftest import free_port, own_postgres, process_stop, wait_for_port
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.own_database import migrate
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
TOKEN = Decimal("0.0001")  # one completion token of the flat model (input is free)


# A POSTGRESQL THAT CAN BE STOPPED


@pytest.fixture
def postgres() -> Iterator[PostgresCluster]:
    with own_postgres() as cluster:
        yield cluster


def django_env(database_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PYTHONPATH=str(ROOT),
    )
    return env


# The catalog, a user and a budgeted key, written by a process of its own into the test's cluster.
SETUP = """
import django, sys
from decimal import Decimal
django.setup()
from billing.services.keys import api_key_create
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.own_database import migrate
provider = ProviderFactory(name="fake-openai", base_url=sys.argv[1] + "/v1")
ModelFactory(name="flat-model", provider=provider, input_per_mtok=Decimal(0), output_per_mtok=Decimal(100))
created = api_key_create(user=UserFactory(username="outage"), name="outage", budget_usd=Decimal(100),
                         budget_period="total")
print(created.secret, created.api_key.pk)
"""


def ledger_ids(database_url: str) -> set[str]:
    import psycopg

    with psycopg.connect(database_url) as connection:
        return {row[0] for row in connection.execute("SELECT request_id FROM billing_usagerecord")}


def ledger_cost(database_url: str, api_key_id: int) -> Decimal:
    import psycopg

    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            "SELECT COALESCE(SUM(cost), 0) FROM billing_usagerecord WHERE api_key_id = %s", [api_key_id]
        ).fetchone()
    return Decimal(row[0])


class Load:
    """Two clients sending chat completions one after another until stopped (at most ``limit`` in all)."""

    def __init__(self, url: str, secret: str, limit: int = 600) -> None:
        self.url, self.secret, self.limit = url, secret, limit
        self.responses: list[tuple[int, str | None]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(2)]

    def _run(self) -> None:
        body = {"model": "flat-model", "messages": [{"role": "user", "content": "[[words=3]] hi"}], "max_tokens": 5}
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                with self.lock:
                    if len(self.responses) >= self.limit:
                        return
                try:
                    response = client.post(
                        f"{self.url}/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {self.secret}"},
                    )
                    outcome = (response.status_code, response.headers.get("x-request-id"))
                except httpx.HTTPError as exc:
                    outcome = (0, type(exc).__name__)
                with self.lock:
                    self.responses.append(outcome)
                time.sleep(0.05)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def count(self) -> int:
        with self.lock:
            return len(self.responses)


def test_rows_spooled_during_a_database_outage_reach_the_ledger_without_celery_or_restart(
    postgres, redis_url, fake_upstream, tmp_path, tmp_path_factory
):
    redis.Redis.from_url(redis_url).flushdb()
    env = django_env(postgres.url, redis_url)
    migrate(postgres.url, env, tmp_path_factory)
    setup = subprocess.run(
        [sys.executable, "-c", SETUP, fake_upstream.base_url],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    secret, api_key_id = setup.stdout.split()
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "llmhub.asgi:application", "--port", str(port), "--lifespan", "on"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process=server)
        with Load(f"http://127.0.0.1:{port}", secret) as load:
            # The caller's key, limits and model are in the server's caches.
            wait_until(lambda: load.count() >= 20, "20 answers before the outage", timeout=30, interval=0.05)
            postgres.stop()
            during = load.count()
            # Twenty more answers with the database down (an event, not a fixed wait: a loaded machine gets the
            # time it needs, a stalled load still fails), then twenty more after it is back.
            wait_until(lambda: load.count() > during + 20, "the load stalled while the database was down", timeout=60)
            postgres.start()
            back = load.count()
            wait_until(lambda: load.count() > back + 20, "the load stalled once the database was back", timeout=60)
        assert server.poll() is None  # the same process throughout: no restart replays anything

        answered = [rid for status, rid in load.responses if status and rid]
        assert len(answered) == len(load.responses), sorted({s for s, _ in load.responses})
        assert {status for status, _ in load.responses} <= {200, 503}
        served = [rid for status, rid in load.responses if status == 200]
        assert len(served) > during + 20  # callers already cached were served through the outage

        # No Celery worker runs, and the server is not restarted: the server replays its spool itself.
        missing = set(answered)

        def all_in_the_ledger() -> bool:
            missing.clear()
            missing.update(set(answered) - ledger_ids(postgres.url))
            return not missing

        wait_until(
            all_in_the_ledger,
            lambda: f"every row reached the ledger ({len(missing)} of {len(answered)} did not)",
            timeout=60,
            interval=0.5,
        )
        spools = list((ROOT / "var").glob(f"test-ledger-spool-{server.pid}.jsonl*"))
        assert not [p for p in spools if not p.name.endswith(".lock") and p.stat().st_size], spools

        # Every settle landed in Redis while the rows waited: the counter is the ledger's total.
        start, _ = period_bounds(BudgetPeriod.TOTAL, timezone.now())
        ref = CounterRef("key", int(api_key_id), "cost", BudgetPeriod.TOTAL, start)
        spent = redis.Redis.from_url(redis_url, decode_responses=True).hget(ref.key, "spent")
        assert ref.from_units(spent) == ledger_cost(postgres.url, int(api_key_id)) > 0
    finally:
        process_stop(server, grace=30)
        log.close()


# SERVICE LEVEL: reconciliation and a rebuilt counter count the spool


@pytest.fixture
def spool(tmp_path, settings):
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    return settings.LLMHUB_LEDGER_SPOOL


@pytest.fixture(params=["redis", "database"])
def counters_store(request, settings):
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        settings.REDIS_URL = url
    else:
        settings.REDIS_URL = ""
    return request.param


@pytest.fixture
def account(transactional_db, fake_upstream):
    provider = ProviderFactory(name="fake-openai", base_url=fake_upstream.base_url + "/v1")
    flat = ModelFactory(name="flat-model", provider=provider, input_per_mtok=Decimal(0), output_per_mtok=Decimal(100))
    user = UserFactory(username="spooled")
    created = api_key_create(user=user, name="spooled")
    api_key_limits_set(api_key=created.api_key, budget_usd=Decimal(1), budget_period=BudgetPeriod.MONTHLY)
    return {"user": user, "key": created.api_key, "flat": flat}


def key_ref(api_key) -> CounterRef:
    start, _ = period_bounds(BudgetPeriod.MONTHLY, timezone.now())
    return CounterRef("key", api_key.pk, "cost", BudgetPeriod.MONTHLY, start)


def spend_and_spool(account, request_id: str, tokens: int) -> None:
    """A request admitted and settled whose ledger row went to the spool (the database refused it)."""

    model = resolved_model(account["flat"])

    async def run() -> None:
        admission = await admission_acquire(
            user_id=account["user"].pk,
            api_key_id=account["key"].pk,
            key_allowed_model_ids=None,
            model=model,
            body={"model": "flat-model", "messages": [], "max_tokens": tokens},
            request_id=request_id,
            prompt_tokens_upper=0,
        )
        await admission_settle(
            admission=admission, cost=tokens * TOKEN, prompt_tokens=0, completion_tokens=tokens, ok=True
        )

    async_to_sync(run)()
    ledger._spool(
        UsageData(
            request_id=request_id,
            endpoint="rest",
            stream=False,
            status="ok",
            user_id=account["user"].pk,
            api_key_id=account["key"].pk,
            model_name="flat-model",
            completion_tokens=tokens,
            cost=tokens * TOKEN,
        )
    )


@pytest.mark.period_instants(only=["leap-day"], tick=True)
def test_reconcile_long_after_the_settle_keeps_spend_that_waits_in_the_spool(counters_store, account, spool):
    """Before, the settle was remembered for SETTLED_MEMORY only: a reconcile after that put the counter
    back on the ledger alone, and the key could spend its spooled spend a second time."""
    spend_and_spool(account, "req_spooled", 40)
    ref = key_ref(account["key"])
    assert counter_state(ref)[0] == 40 * TOKEN
    assert not UsageRecord.objects.exists()

    with time_machine.travel(timezone.now() + SETTLED_MEMORY + timedelta(minutes=5)):
        budget_counters_reconcile()
        assert counter_state(ref)[0] == 40 * TOKEN

        # Once the rows are in the ledger, the same figure comes from there.
        assert ledger.ledger_replay_spool() == 1
        budget_counters_reconcile()
        assert counter_state(ref)[0] == 40 * TOKEN == UsageRecord.objects.get().cost


@pytest.mark.period_instants(only=["leap-day"], tick=True)
def test_a_counter_rebuilt_while_rows_wait_in_the_spool_counts_them(counters_store, account, spool, settings):
    """Redis lost the counter (or the database store starts a new one) while the ledger misses spooled
    rows: the rebuilt counter holds them, so the budget still refuses what it would have refused."""
    spend_and_spool(account, "req_before_loss", 60)
    ref = key_ref(account["key"])
    if counters_store == "redis":
        redis.Redis.from_url(settings.REDIS_URL).delete(ref.key, ref.key + ":exp", ref.key + ":set")
    else:
        from billing.models import BudgetCounter

        BudgetCounter.objects.filter(key=ref.key).delete()

    spend_and_spool(account, "req_after_loss", 1)

    assert counter_state(ref)[0] == 61 * TOKEN


def test_compose_shares_the_spool_between_the_servers_and_the_replaying_worker():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    spool = Path(services["web"]["environment"]["LLMHUB_LEDGER_SPOOL"])
    for name in ("web", "worker", "beat"):
        assert services[name]["environment"]["LLMHUB_LEDGER_SPOOL"] == str(spool), name
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in services[name]["volumes"]}
        assert mounts.get(str(spool.parent)) == "ledger-spool", name
    assert "ledger-spool" in compose["volumes"]


# SEVERAL PROCESSES ON ONE SPOOL

SPOOL_WORKER = """
import sys, time
from decimal import Decimal
from pathlib import Path
import django
django.setup()
from django.conf import settings
settings.LLMHUB_LEDGER_SPOOL = sys.argv[1]
from billing.services import ledger
role, tag = sys.argv[2], sys.argv[3]
if role == "append":
    for i in range(int(sys.argv[4])):
        row = ledger.UsageData(request_id=f"{tag}-{i}", endpoint="rest", stream=False, status="ok",
                               model_name="m", cost=Decimal("0.0001"))
        ledger._spool(row)
else:
    stop = Path(sys.argv[4])
    while not stop.exists():
        ledger.ledger_replay_spool()
        time.sleep(0.005)
"""


@pytest.mark.django_db(transaction=True)
def test_processes_appending_and_replaying_one_spool_at_once_lose_and_double_nothing(spool, tmp_path):
    """Servers append while others (a server's watcher, the beat task) replay: every row reaches the ledger
    once, none is left behind in a file that was claimed while a row was being added to it."""
    from tests.conftest import database_url_for_subprocesses

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        PYTHONPATH=str(ROOT),
    )
    stop = tmp_path / "stop"

    def worker(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", SPOOL_WORKER, str(spool), *args], cwd=ROOT, env=env)

    replayers = [worker("replay", f"r{n}", str(stop)) for n in range(2)]
    appenders = [worker("append", f"a{n}", "300") for n in range(3)]
    try:
        assert [appender.wait(timeout=120) for appender in appenders] == [0, 0, 0]
    finally:
        stop.touch()
        for replayer in replayers:
            replayer.wait(timeout=60)
    assert [replayer.returncode for replayer in replayers] == [0, 0]
    ledger.ledger_replay_spool()  # what the replayers had not got to yet

    ids = list(UsageRecord.objects.values_list("request_id", flat=True))
    assert len(ids) == len(set(ids)) == 900
    assert set(ids) == {f"a{n}-{i}" for n in range(3) for i in range(300)}
    assert not [p.name for p in spool.parent.iterdir() if p.name not in (spool.name + ".lock", stop.name)]
