"""Budgets and rate limits hold when many requests race, in one process and across processes.

Service level: many concurrent ``admission_acquire`` calls in this process, and two worker processes
admitting for the same key at once. End to end: two llmhub server processes (uvicorn) sharing the test
database and the real Redis, hit by 50 or 60 parallel HTTP requests; and the same without Redis, where
row locks guard the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from billing.exceptions import QuotaExceededError
from billing.models import BudgetPeriod, UsageRecord, UsageStatus
from billing.services.admission import admission_acquire, admission_settle
from billing.services.budgets import CounterRef, api_key_limits_set, period_bounds
from billing.services.counters import counter_state
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.selectors import resolved_model
from providers.tokens import prompt_token_bounds
from tests.conftest import database_url_for_subprocesses, free_port, process_stop, python_argv, wait_for_port
from tests.factories import ModelFactory, UserFactory
from tests.waiting import wait_for_ledger_rows

# Every process of a test (this one, the workers, the servers) has its clock pinned at the same instant, so
# that they agree on the month the budget is in, at the instants where it is easiest to disagree.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.period_instants]
# The end-to-end tests are about races, not periods: one instant, a month's last second, where a server
# whose clock was not pinned would count in another month than this test.
SERVERS_PINNED = pytest.mark.period_instants(only=["last-second-of-month"])

ROOT = Path(__file__).resolve().parents[2]
TOKEN = Decimal("0.0001")  # one completion token of the flat model
MAX_TOKENS = 5
RESERVATION = MAX_TOKENS * TOKEN  # input is free on the flat model, so this is what one request reserves
BODY = {
    "model": "flat-model",
    # The fake upstream answers exactly MAX_TOKENS words, so each request costs exactly its reservation.
    "messages": [{"role": "user", "content": f"[[words={MAX_TOKENS}]] count for me"}],
    "max_tokens": MAX_TOKENS,
}


@pytest.fixture
def budget_key(plans, catalog):
    """An Enterprise user's key whose monthly budget pays for exactly 10 requests."""
    user = UserFactory(username="racer")
    plan_assign(user=user, plan=plans["Enterprise"])
    created = api_key_create(user=user, name="racer")
    api_key_limits_set(api_key=created.api_key, budget_usd=10 * RESERVATION, budget_period=BudgetPeriod.MONTHLY)
    return {"user": user, "key": created.api_key, "secret": created.secret, "flat": catalog["flat"]}


def key_ref(api_key) -> CounterRef:
    start, _ = period_bounds(BudgetPeriod.MONTHLY, timezone.now())
    return CounterRef("key", api_key.pk, "cost", BudgetPeriod.MONTHLY, start)


def ledger_sum(api_key) -> Decimal:
    return sum(UsageRecord.objects.filter(api_key=api_key).values_list("cost", flat=True), Decimal(0))


def server_env(redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        PYTHONPATH=str(ROOT),
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


class ServerProcess:
    """``uvicorn llmhub.asgi:application`` in its own process, on the test database. ``resettable``: one that tests
    share (``ServerPairs``), run by ``tests.resettable_server``, which ``held`` and ``reset`` talk to."""

    def __init__(self, redis_url: str | None, log: Path, clock: datetime | None, *, resettable: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Its log (a warning per 429) goes to a file: read it when a test fails.
        self.log = log.open("w")
        argv = ["uvicorn", "llmhub.asgi:application", "--port", str(self.port), "--log-level", "warning"]
        self.replies = None
        if resettable:
            replies, reply_fd = os.pipe()
            argv = ["tests.resettable_server", str(reply_fd), *argv]
        self.process = subprocess.Popen(
            python_argv(clock, *argv),
            cwd=ROOT,
            env=server_env(redis_url),
            stdin=subprocess.PIPE if resettable else None,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(reply_fd,) if resettable else (),
        )
        if resettable:
            os.close(reply_fd)
            self.replies = os.fdopen(replies)

    def command(self, command: str) -> int:
        """What the server still holds of a test (``tests.resettable_server``), after ``command`` (held, reset)."""
        self.process.stdin.write(f"{command}\n".encode())
        self.process.stdin.flush()
        if not select.select([self.replies], [], [], 60)[0]:
            raise TimeoutError(f"server on port {self.port} did not answer {command!r} within 60 s")
        return int(self.replies.readline())

    def stop(self) -> None:
        # SIGTERM: uvicorn's lifespan shutdown drains the ledger before the process exits (SIGKILL if it never does).
        process_stop(self.process, grace=30)
        self.log.close()
        if self.replies is not None:
            self.process.stdin.close()
            self.replies.close()

    def diagnostics(self) -> str:
        """What it is doing (``core.diagnostics``: every thread's and task's stack, its ledger writers), from its
        log after a SIGUSR1; what is there after 10 s if it never logs it."""
        if self.process.poll() is not None:
            return f"(ended with {self.process.returncode})"
        path = Path(self.log.name)
        marker = "WARNING llmhub.diagnostics "  # the record's header (its text is in its own stack too)
        before = path.read_text(errors="replace").count(marker)
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = path.read_text(errors="replace")
            if text.count(marker) > before:
                time.sleep(0.5)  # the dump is one record, written at once; its end follows it
                return path.read_text(errors="replace").rsplit(marker, 1)[1]
            time.sleep(0.1)
        return "(no diagnostics within 10 s)"


class Servers(list):
    """The servers' URLs, and the servers (``processes``)."""

    processes: list[ServerProcess]


@contextlib.contextmanager
def servers_diagnosed_on_failure(servers: Servers) -> Iterator[None]:
    """If the block fails (a wait for ledger rows that never arrive, say), print what each server is doing and
    the SQLite database's file locks, into the failure's captured output: a server whose writer is stuck shows
    where, which a failure seen only in CI can be read from."""
    try:
        yield
    except BaseException:
        for n, server in enumerate(servers.processes):
            print(f"== server-{n} (pid {server.process.pid}) diagnostics:{server.diagnostics()}")
        print(f"== this test's pid {os.getpid()}; file locks:\n{sqlite_file_locks()}")
        raise


def sqlite_file_locks() -> str:
    """/proc/locks' lines on the test database's file (SQLite), each with its holder's command line."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.sqlite3" or not Path("/proc/locks").exists():
        return "(not SQLite, or no /proc/locks)"
    inode = os.stat(db["NAME"]).st_ino
    lines = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5].rsplit(":", 1)[-1] == str(inode):
            cmdline = Path(f"/proc/{fields[4]}/cmdline")
            holder = (
                cmdline.read_bytes().replace(b"\0", b" ")[:160].decode(errors="replace") if cmdline.exists() else "?"
            )
            lines.append(f"{line}  [{holder}]")
    return "\n".join(lines) or "(none)"


class ServerPairs:
    """Two llmhub processes per store ("redis": sharing the real Redis server; "database": row locks) and clock, kept
    for a module's tests: starting a pair cost each test about ten seconds (two Django start-ups) on a loaded
    machine, most of its time. A test finds its pair as a fresh one: told to forget the last test before it
    starts (``tests.resettable_server``: the lookups it cached, by names this test reuses; breakers, routing
    figures and rate windows, by ids), and waited for after it until everything it took is settled and written
    (as stopping a server drained its ledger), before the database is emptied. A pair that still holds something of
    a test then, or whose process ended, is stopped and another started."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pairs: dict[tuple[str, datetime | None], Servers] = {}
        self.started = 0

    def pair(self, store: str, redis_url: str | None, clock: datetime | None) -> Servers:
        servers = self.pairs.get((store, clock))
        if servers is not None and (not self.alive(servers) or any(s.command("reset") for s in servers.processes)):
            self.stop(store, clock)
            servers = None
        if servers is None:
            servers = self.pairs[(store, clock)] = self.start(redis_url, clock)
        return servers

    def start(self, redis_url: str | None, clock: datetime | None) -> Servers:
        self.started += 1
        logs = [self.directory / f"pair-{self.started}-server-{n}.log" for n in range(2)]
        processes = [ServerProcess(redis_url, log, clock, resettable=True) for log in logs]
        try:
            for server in processes:
                wait_for_port(server.port, process=server.process)
        except BaseException:
            for server in processes:
                server.stop()
            raise
        servers = Servers(server.url for server in processes)
        servers.processes = processes
        return servers

    @staticmethod
    def alive(servers: Servers) -> bool:
        return all(server.process.poll() is None for server in servers.processes)

    def settle(self, store: str, clock: datetime | None) -> None:
        """After a test, until its pair holds nothing of it (60 s at most; then it is stopped, which drains it)."""
        servers = self.pairs[(store, clock)]
        deadline = time.monotonic() + 60
        while self.alive(servers) and time.monotonic() < deadline:
            if not any(server.command("held") for server in servers.processes):
                return
            time.sleep(0.05)
        self.stop(store, clock)

    def stop(self, store: str, clock: datetime | None) -> None:
        for server in self.pairs.pop((store, clock)).processes:
            server.stop()

    def stop_all(self) -> None:
        for store, clock in list(self.pairs):
            self.stop(store, clock)


@pytest.fixture(scope="module")
def server_pairs(django_db_setup, tmp_path_factory) -> Iterator[ServerPairs]:
    pairs = ServerPairs(tmp_path_factory.mktemp("servers"))
    try:
        yield pairs
    finally:
        pairs.stop_all()


@pytest.fixture
def two_servers(request, period_clock, server_pairs):
    """Two llmhub processes (the module's pair for ``request.param``, "redis" or "database", and this test's clock);
    with "redis" they share the real Redis server, emptied for this test."""
    store = request.param
    redis_url = request.getfixturevalue("use_redis") if store == "redis" else None
    servers = server_pairs.pair(store, redis_url, period_clock)
    try:
        yield servers
    finally:
        server_pairs.settle(store, period_clock)


async def post_all(urls: list[str], secret: str, count: int, body: dict = BODY) -> list[httpx.Response]:
    """``count`` chat completions (of ``body``) at once, spread over the servers."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{urls[i % len(urls)]}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {secret}"},
                )
                for i in range(count)
            )
        )


def assert_budget_held(budget_key, responses, fake_upstream) -> None:
    statuses = sorted(r.status_code for r in responses)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == len(responses), statuses
    # The budget pays for exactly 10 and every request costs exactly its reservation.
    assert len(ok) == 10
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    assert fake_upstream.stats["requests"] == 10  # refused requests never went upstream

    # Ledger rows are written after the response; every request (refused ones too) gets one. The bound is
    # for liveness, not speed: with the database store on SQLite, two servers and four xdist workers on two
    # cores, a batch can wait out SQLite's 20 s busy timeout, be spooled and be replayed (fresh-clone CI on
    # ea971b1 ran past 30 s once; alone the test waits about a second).
    wait_for_ledger_rows(len(responses), api_key=budget_key["key"], timeout=60, interval=0.1)
    spent, reserved = counter_state(key_ref(budget_key["key"]))
    budget = 10 * RESERVATION
    assert spent <= budget + RESERVATION
    assert reserved == 0
    assert ledger_sum(budget_key["key"]) == spent == budget
    assert UsageRecord.objects.filter(api_key=budget_key["key"], status=UsageStatus.REJECTED).count() == 40


# SERVICE LEVEL


async def test_concurrent_admissions_in_one_process_never_overspend(store, budget_key):
    flat = await sync_to_async(resolved_model)(budget_key["flat"])

    async def one(index: int):
        try:
            return await admission_acquire(
                user_id=budget_key["user"].pk,
                api_key_id=budget_key["key"].pk,
                key_allowed_model_ids=None,
                model=flat,
                body=BODY,
                request_id=f"one-{index}",
                prompt_tokens_upper=0,
            )
        except QuotaExceededError:
            return None

    admissions = await asyncio.gather(*(one(i) for i in range(50)))
    admitted = [a for a in admissions if a is not None]
    assert len(admitted) == 10
    await asyncio.gather(
        *(
            admission_settle(admission=a, cost=RESERVATION, prompt_tokens=0, completion_tokens=MAX_TOKENS, ok=True)
            for a in admitted
        )
    )
    assert await sync_to_async(counter_state)(key_ref(budget_key["key"])) == (10 * RESERVATION, Decimal(0))


@pytest.mark.parametrize("store_kind", ["database", "redis"])
def test_two_processes_admitting_for_one_key_never_overspend(request, store_kind, budget_key, settings, period_clock):
    redis_url = request.getfixturevalue("use_redis") if store_kind == "redis" else None
    settings.REDIS_URL = redis_url or ""
    job = {
        "user_id": budget_key["user"].pk,
        "key_id": budget_key["key"].pk,
        "model": "flat-model",
        "max_tokens": MAX_TOKENS,
        "count": 25,
        "start_at": time.monotonic() + 3,
    }
    workers = [
        subprocess.Popen(
            python_argv(period_clock, "tests.billing.admission_worker", json.dumps({**job, "tag": f"w{n}"})),
            cwd=ROOT,
            env=server_env(redis_url),
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    results = [json.loads(worker.communicate(timeout=90)[0]) for worker in workers]

    assert sum(r["admitted"] for r in results) == 10
    assert sum(r["refused"] for r in results) == 40
    spent, reserved = counter_state(key_ref(budget_key["key"]))
    assert ledger_sum(budget_key["key"]) == spent == 10 * RESERVATION
    assert reserved == 0


# END TO END


@SERVERS_PINNED
@pytest.mark.parametrize("two_servers", ["redis", "database"], indirect=True)
def test_fifty_parallel_requests_on_two_servers_spend_at_most_the_budget(two_servers, budget_key, fake_upstream):
    responses = asyncio.run(post_all(two_servers, budget_key["secret"], 50))
    assert_budget_held(budget_key, responses, fake_upstream)


@SERVERS_PINNED
def test_fifty_parallel_requests_without_redis_hold_the_budget_with_row_locks(
    llmhub_server, budget_key, fake_upstream, settings
):
    settings.REDIS_URL = ""
    responses = asyncio.run(post_all([llmhub_server.url], budget_key["secret"], 50))
    assert_budget_held(budget_key, responses, fake_upstream)


@SERVERS_PINNED
@pytest.mark.parametrize("two_servers", ["redis", "database"], indirect=True)
def test_two_parallel_cjk_prompts_cannot_both_pass_a_budget_that_pays_for_one(two_servers, budget_key, fake_upstream):
    """A byte-level BPE bills a CJK character one to three tokens; the fake upstream, told ``[[count=bytes]]``, bills
    three, its UTF-8 bytes, as such a tokenizer at its worst. Reserved at two characters a token (about 180 tokens for
    this prompt of 300), two of them passed a budget that pays for one and a half, and spent two: past it. Reserved
    at their bytes, the second is refused, whether the first has settled yet or not."""
    ModelFactory(
        name="input-model",
        provider=budget_key["flat"].deployments.get().provider,
        input_per_mtok=Decimal("100.00"),  # $0.0001 an input token: a request costs its prompt tokens × TOKEN
        output_per_mtok=Decimal("0"),
    )
    prompt = "漢字" * 150 + " [[count=bytes]]"
    body = {"model": "input-model", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}
    billed = 3 + len(prompt.encode())  # the fake upstream's count: a message's framing and a token a byte
    budget = (billed + billed // 2) * TOKEN
    api_key_limits_set(api_key=budget_key["key"], budget_usd=budget, budget_period=BudgetPeriod.MONTHLY)

    responses = asyncio.run(post_all(two_servers, budget_key["secret"], 2, body))

    assert sorted(r.status_code for r in responses) == [200, 429], [r.text[:300] for r in responses]
    answered, refused = sorted(responses, key=lambda r: r.status_code)
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert fake_upstream.stats["requests"] == 1
    assert answered.json()["usage"]["prompt_tokens"] == billed <= prompt_token_bounds(body, operation="chat")[0]
    wait_for_ledger_rows(2, api_key=budget_key["key"], timeout=60, interval=0.1)
    spent, reserved = counter_state(key_ref(budget_key["key"]))
    assert reserved == 0
    assert ledger_sum(budget_key["key"]) == spent == billed * TOKEN <= budget


@SERVERS_PINNED
@pytest.mark.parametrize("two_servers", ["redis"], indirect=True)
def test_thirty_requests_per_minute_admit_exactly_thirty_of_sixty(two_servers, budget_key, fake_upstream):
    api_key_limits_set(api_key=budget_key["key"], budget_usd=None, rpm=30)

    responses = asyncio.run(post_all(two_servers, budget_key["secret"], 60))

    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(limited)) == (30, 30), [
        (r.status_code, r.text[:200]) for r in responses if r.status_code != 200
    ]
    assert fake_upstream.stats["requests"] == 30
    for response in limited:
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert response.headers["x-ratelimit-limit-requests"] == "30"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    assert remaining == list(range(30))  # each admitted request saw one slot fewer
    assert all(r.headers["x-ratelimit-limit-requests"] == "30" for r in ok)
    assert all(r.headers["x-ratelimit-reset-requests"].endswith("s") for r in ok)


@SERVERS_PINNED
@pytest.mark.parametrize("two_servers", ["redis"], indirect=True)
def test_a_request_that_cannot_be_paid_never_reaches_the_upstream(two_servers, budget_key, fake_upstream):
    api_key_limits_set(api_key=budget_key["key"], budget_usd=TOKEN * 3)

    response = httpx.post(
        f"{two_servers[0]}/v1/chat/completions",
        json={**BODY, "max_tokens": 4},
        headers={"Authorization": f"Bearer {budget_key['secret']}"},
        timeout=30,
    )

    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    assert "this API key's monthly budget is $0.0003" in error["message"]
    assert fake_upstream.stats["requests"] == 0
