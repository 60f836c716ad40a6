"""Assignment: sticky, deterministic, cached per model, and only while an experiment runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.utils import timezone

from billing.services.keys import api_key_create
from experiments.assignment import assignment_cache, assignment_unit, experiment_assign
from experiments.models import Experiment, ExperimentStatus, Variant
from experiments.services import (
    experiment_allocation_set,
    experiment_conclude,
    experiment_pause,
    experiment_promote,
    experiment_start,
)
from tests.conftest import free_port, process_stop, wait_for_port
from tests.factories import UserFactory
from tests.transactions import read_before_commit

pytestmark = pytest.mark.django_db


def assign_many(model_id: int, n: int) -> Counter[str | None]:
    assign = async_to_sync(experiment_assign)
    counts: Counter[str | None] = Counter()
    for user in range(n):
        assignment = assign(model_id=model_id, unit=f"user:{user}")
        counts[assignment.header if assignment is not None else None] += 1
    return counts


def test_a_running_experiment_splits_users_by_allocation(ab_experiment):
    ab = ab_experiment(control=30, treatment=20)
    counts = assign_many(ab.model.pk, 4000)
    assert set(counts) == {"ab-test:control", "ab-test:treatment", None}
    assert 0.26 < counts["ab-test:control"] / 4000 < 0.34
    assert 0.16 < counts["ab-test:treatment"] / 4000 < 0.24


def header_of(model_id: int, unit: str) -> str | None:
    assignment = async_to_sync(experiment_assign)(model_id=model_id, unit=unit)
    return assignment.header if assignment is not None else None


def test_no_query_per_request_once_the_models_plan_is_cached(ab_experiment, django_assert_num_queries):
    ab = ab_experiment(control=50, treatment=50)
    header_of(ab.model.pk, "user:warm")
    with django_assert_num_queries(0):
        assert {header_of(ab.model.pk, f"user:{n}") for n in range(200)} == {"ab-test:control", "ab-test:treatment"}
    other = ab_experiment(name="other", model_name="no-experiment-model", status=ExperimentStatus.DRAFT)
    assert header_of(other.model.pk, "user:1") is None  # a model without a running experiment: cached too
    with django_assert_num_queries(0):
        assert header_of(other.model.pk, "user:2") is None


def test_a_change_in_this_process_is_seen_by_the_next_request(ab_experiment):
    ab = ab_experiment(control=50, treatment=0)
    assert {header_of(ab.model.pk, f"user:{n}") for n in range(300)} == {"ab-test:control", None}
    experiment_allocation_set(experiment=ab.experiment, allocations={"control": 0, "treatment": 100}, actor=None)
    assert {header_of(ab.model.pk, f"user:{n}") for n in range(300)} == {"ab-test:treatment"}


def test_paused_assigns_nobody_and_a_resume_gives_everyone_their_variant_back(ab_experiment):
    ab = ab_experiment(control=30, treatment=30)
    before = [header_of(ab.model.pk, f"user:{n}") for n in range(500)]
    experiment_pause(experiment=ab.experiment, actor=None)
    assert {header_of(ab.model.pk, f"user:{n}") for n in range(500)} == {None}
    experiment_start(experiment=ab.experiment, actor=None)
    assert [header_of(ab.model.pk, f"user:{n}") for n in range(500)] == before


def test_outside_its_start_and_end_a_running_experiment_assigns_nobody(ab_experiment):
    ab = ab_experiment(control=50, treatment=50)
    start = timezone.now() + timedelta(hours=1)
    Experiment.objects.filter(pk=ab.experiment.pk).update(starts_at=start, ends_at=start + timedelta(days=1))
    assignment_cache.invalidate()  # .update() sends no signal
    assert header_of(ab.model.pk, "user:1") is None
    with time_machine.travel(start + timedelta(minutes=1), tick=False):
        assert header_of(ab.model.pk, "user:1") is not None
    with time_machine.travel(start + timedelta(days=1), tick=False):
        assert header_of(ab.model.pk, "user:1") is None


def test_concluded_assigns_nobody_unless_a_winner_was_promoted_which_keeps_serving_everyone(ab_experiment):
    ab = ab_experiment(control=40, treatment=40)
    experiment_conclude(experiment=ab.experiment, actor=None)
    assert {header_of(ab.model.pk, f"user:{n}") for n in range(300)} == {None}

    promoted = ab_experiment(name="ab-promoted", model_name="promoted-model", control=20, treatment=20)
    experiment_promote(experiment=promoted.experiment, variant=promoted.treatment, actor=None)
    assert {header_of(promoted.model.pk, f"user:{n}") for n in range(300)} == {"ab-promoted:treatment"}
    experiment_conclude(experiment=promoted.experiment, actor=None)
    assert {header_of(promoted.model.pk, f"user:{n}") for n in range(300)} == {"ab-promoted:treatment"}
    # Until another experiment runs on that model: then that one assigns.
    successor = Experiment.objects.create(name="successor", model=promoted.model)
    Variant.objects.create(experiment=successor, name="a", is_control=True, allocation=50)
    Variant.objects.create(experiment=successor, name="b", deployment=promoted.treatment_deployment, allocation=50)
    experiment_start(experiment=successor, actor=None)
    assert {header_of(promoted.model.pk, f"user:{n}") for n in range(300)} == {"successor:a", "successor:b"}


def test_the_unit_is_the_end_user_of_a_key_else_the_user_else_the_key():
    assert assignment_unit(user_id=7, api_key_id=3, end_user="alice") == "key:3:user:alice"
    assert assignment_unit(user_id=7, api_key_id=3, end_user=None) == "user:7"
    assert assignment_unit(user_id=7, api_key_id=None, end_user="alice") == "user:7"  # a session user is themself
    assert assignment_unit(user_id=None, api_key_id=3) == "key:3"
    assert assignment_unit(user_id=None, api_key_id=None) is None


# STICKINESS ACROSS PROCESSES AND RESTARTS

ROOT = Path(__file__).resolve().parents[2]
USERS = 10_000

# Each process computes every simulated user's variant from the database as a server process would (its own
# cache, its own hashing); prints them as JSON.
ASSIGN_SCRIPT = """
import asyncio, json, sys
import django
django.setup()
from experiments.assignment import experiment_assign

async def main(model_id, users):
    out = []
    for user in range(users):
        assignment = await experiment_assign(model_id=model_id, unit=f"user:{user}")
        out.append(assignment.variant.name if assignment is not None else None)
    return out

print(json.dumps(asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))))
"""


def django_env() -> dict[str, str]:
    from tests.conftest import database_url_for_subprocesses

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        PYTHONPATH=str(ROOT),
    )
    return env


def assign_in_processes(model_id: int, processes: int) -> list[list[str | None]]:
    """Start ``processes`` Python processes at once, each computing all USERS assignments."""
    started = [
        subprocess.Popen(
            [sys.executable, "-c", ASSIGN_SCRIPT, str(model_id), str(USERS)],
            cwd=ROOT,
            env=django_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for process in started:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    return results


def assign_here(model_id: int) -> list[str | None]:
    """The same in this process, on one event loop (an ``async_to_sync`` per user took seconds)."""

    async def all_users() -> list[str | None]:
        out = []
        for user in range(USERS):
            assignment = await experiment_assign(model_id=model_id, unit=f"user:{user}")
            out.append(assignment.variant.name if assignment is not None else None)
        return out

    return async_to_sync(all_users)()


@pytest.mark.django_db(transaction=True)
def test_ten_thousand_users_keep_their_variant_across_processes_restarts_and_a_raised_allocation(ab_experiment):
    ab = ab_experiment(control=10, treatment=10)
    first, second = assign_in_processes(ab.model.pk, 2)  # two processes side by side
    (restarted,) = assign_in_processes(ab.model.pk, 1)  # and a new one after they are gone
    here = assign_here(ab.model.pk)
    assert first == second == restarted == here
    counts = Counter(here)
    assert 850 < counts["control"] < 1150 and 850 < counts["treatment"] < 1150
    assert counts[None] == USERS - counts["control"] - counts["treatment"]

    experiment_allocation_set(experiment=ab.experiment, allocations={"treatment": "20"}, actor=None, reason="test")
    (raised,) = assign_in_processes(ab.model.pk, 1)
    assert raised == assign_here(ab.model.pk)
    moved = [(before, after) for before, after in zip(here, raised, strict=True) if before != after]
    # Nobody moves except into the raised variant, and only from the untouched share.
    assert set(moved) == {(None, "treatment")}
    assert 850 < len(moved) < 1150
    assert Counter(raised)["control"] == counts["control"]


# THE SAME THROUGH TWO LIVE SERVER PROCESSES

# Where assignment puts an end user depends on the key's id, which the tests run before in a worker decide: of
# these, the test sends those that land in each variant and outside the experiment (12 fixed ones all landed outside
# the treatment once, a chance of 0.6^12).
END_USERS = [f"end-user-{n}" for n in range(200)]
EACH = 4


class ServerProcess:
    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "llmhub.asgi:application", "--port", str(self.port), "--lifespan", "on"],
            cwd=ROOT,
            env=django_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, timeout=60, process=self.process)

    def headers(self, key: str, model: str, end_users: list[str]) -> list[str | None]:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)
        seen = []
        for end_user in end_users:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hello"}], user=end_user
            )
            assert raw.status_code == 200
            seen.append(raw.headers.get("x-llmhub-experiment"))
        return seen

    def stop(self) -> None:
        process_stop(self.process, grace=30)
        self.log.close()


@pytest.mark.django_db(transaction=True)
def test_requests_get_the_same_variant_from_two_server_processes_and_after_a_restart(ab_experiment, tmp_path):
    ab = ab_experiment(control=40, treatment=40)
    created = api_key_create(user=UserFactory(username="app"), name="app")
    assign = async_to_sync(experiment_assign)
    chosen: dict[str | None, list[str]] = {}
    for end_user in END_USERS:
        unit = assignment_unit(user_id=created.api_key.user_id, api_key_id=created.api_key.pk, end_user=end_user)
        assignment = assign(model_id=ab.model.pk, unit=unit)
        landed = chosen.setdefault(assignment.header if assignment is not None else None, [])
        if len(landed) < EACH:
            landed.append(end_user)
    assert {header: len(users) for header, users in chosen.items()} == {
        "ab-test:control": EACH,
        "ab-test:treatment": EACH,
        None: EACH,
    }
    end_users = [end_user for users in chosen.values() for end_user in users]
    expected = [header for header, users in chosen.items() for _ in users]

    servers = [ServerProcess(tmp_path / "a.log"), ServerProcess(tmp_path / "b.log")]
    try:
        assert servers[0].headers(created.secret, "ab-model", end_users) == expected
        assert servers[1].headers(created.secret, "ab-model", end_users) == expected
        servers[0].stop()
        servers[0] = ServerProcess(tmp_path / "a.log")  # a restart
        assert servers[0].headers(created.secret, "ab-model", end_users) == expected
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def pinned_clock():
    """The clock pinned at noon on 2026-12-01; ``shift`` moves it on (each decision at its own instant)."""
    with time_machine.travel(datetime(2026, 12, 1, 12, 0, tzinfo=UTC), tick=False) as clock:
        yield clock


def _successor(ab, name: str = "successor") -> Experiment:
    """A second experiment on ``ab``'s model, a draft: control = the model as routed, b = the treatment's."""
    successor = Experiment.objects.create(name=name, model=ab.model)
    Variant.objects.create(experiment=successor, name="a", is_control=True, allocation=50)
    Variant.objects.create(experiment=successor, name="b", deployment=ab.treatment_deployment, allocation=50)
    return successor


def _headers(model_id: int) -> set[str | None]:
    return {header_of(model_id, f"user:{n}") for n in range(300)}


def test_a_newer_experiment_paused_or_concluded_unpromoted_does_not_bring_back_an_older_promoted_winner(
    ab_experiment, pinned_clock
):
    """The newest decision about a model holds: a winner serves until another experiment starts on the
    model; pausing that one, or concluding it without a winner, leaves the model as routed (that
    experiment's control and its untouched share), not the older winner back."""
    clock = pinned_clock
    ab = ab_experiment(name="old", control=50, treatment=50)
    experiment_promote(experiment=ab.experiment, variant=ab.treatment, actor=None)
    experiment_conclude(experiment=ab.experiment, actor=None)
    assert _headers(ab.model.pk) == {"old:treatment"}

    clock.shift(timedelta(days=1))
    successor = _successor(ab)
    experiment_start(experiment=successor, actor=None)
    assert _headers(ab.model.pk) == {"successor:a", "successor:b"}
    clock.shift(timedelta(hours=1))
    experiment_pause(experiment=successor, actor=None)
    assert _headers(ab.model.pk) == {None}
    clock.shift(timedelta(hours=1))
    experiment_start(experiment=successor, actor=None)
    clock.shift(timedelta(hours=1))
    experiment_conclude(experiment=successor, actor=None)
    assert _headers(ab.model.pk) == {None}


def test_a_winner_promoted_after_another_experiment_was_paused_serves_until_that_one_resumes(
    ab_experiment, pinned_clock
):
    clock = pinned_clock
    ab = ab_experiment(name="old", control=50, treatment=50, status=ExperimentStatus.DRAFT)
    successor = _successor(ab, "paused-first")
    experiment_start(experiment=successor, actor=None)
    clock.shift(timedelta(hours=1))
    experiment_pause(experiment=successor, actor=None)
    # Then the other experiment runs on the model, has a winner and concludes: the newest decision.
    clock.shift(timedelta(hours=1))
    experiment_start(experiment=ab.experiment, actor=None)
    experiment_promote(experiment=ab.experiment, variant=ab.treatment, actor=None)
    clock.shift(timedelta(hours=1))
    experiment_conclude(experiment=ab.experiment, actor=None)
    assert _headers(ab.model.pk) == {"old:treatment"}
    # Resuming the paused one ends that winner's reign, and pausing it again does not bring it back.
    clock.shift(timedelta(hours=1))
    experiment_start(experiment=successor, actor=None)
    assert _headers(ab.model.pk) == {"paused-first:a", "paused-first:b"}
    clock.shift(timedelta(hours=1))
    experiment_pause(experiment=successor, actor=None)
    assert _headers(ab.model.pk) == {None}


@pytest.mark.django_db(transaction=True)
def test_a_request_that_reads_the_plan_while_a_pause_commits_does_not_keep_it_for_the_next(ab_experiment):
    """The pause drops the cached plans before it commits; a request that reads the plan in between (another
    connection: the experiment still runs for it) must not keep that copy, or the requests after the pause
    answered would stay in their variants for the cache's TTL."""
    ab = ab_experiment(control=50, treatment=50)

    meanwhile = read_before_commit(
        lambda: experiment_pause(experiment=ab.experiment, actor=None), lambda: _headers(ab.model.pk)
    )

    assert meanwhile == {"ab-test:control", "ab-test:treatment"}  # the pause was not committed yet
    assert _headers(ab.model.pk) == {None}
