"""Health checks of deployments: a round of probes against the fake upstream over real HTTP, kept as
``HealthCheck`` rows, moving the breakers the router reads; free unless a deployment asks for a paid probe."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.test import override_settings

from providers.models import Deployment, HealthCheck, HealthStatus, ModelMode, Provider, ProviderKind
from providers.routing import route_candidates
from providers.routing.breaker_machine import CLOSED, HALF_OPEN, OPEN
from providers.routing.breakers import breaker_record, breaker_state
from providers.selectors import model_resolve, resolved_model
from providers.services.health import health_check_round, health_checks_prune
from providers.tasks import providers_health_check_all
from tests.conftest import free_port
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory
from tests.providers.health_probes import breakers_closed_after, set_fault  # noqa: F401  (a fixture)
from tests.shared_redis import use_redis  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("breakers_closed_after")]

KEY = "sk-health-secret-key-0123456789abcdefghij"


@pytest.fixture(params=["memory", "redis"])
def home(request, settings):
    """Where the breakers live: this process's memory, or the real Redis every process shares (emptied)."""
    if request.param == "redis":
        request.getfixturevalue("use_redis")
    else:
        settings.REDIS_URL = ""
    return request.param


def checks(deployment: Deployment) -> list[tuple[bool, str]]:
    return [(check.ok, check.error) for check in deployment.health_checks.order_by("checked_at", "pk")]


def served(upstream) -> dict[str, int]:
    """Requests the fake upstream served, by path (its control endpoint, which counts itself out)."""
    return httpx.get(upstream.base_url + "/_fake/stats").json()["by_path"]


def logged(upstream, path: str) -> list[dict]:
    return [entry for entry in httpx.get(upstream.base_url + "/_fake/requests").json() if entry["path"] == path]


@pytest.fixture
def empty_lister() -> Iterator[str]:
    """An OpenAI-compatible server whose model list is empty (as some self-hosted servers answer)."""
    port = free_port()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"object": "list", "data": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/v1"
    server.shutdown()
    server.server_close()


def test_one_free_model_list_per_provider_answers_for_all_its_deployments(fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    mini = ModelFactory(provider=provider, upstream_id="fake-gpt-4o-mini").deployments.get()
    big = ModelFactory(provider=provider, upstream_id="fake-gpt-4o").deployments.get()
    gone = ModelFactory(provider=provider, upstream_id="retired-model").deployments.get()

    assert providers_health_check_all.delay().get() == {provider.name: True}

    assert checks(mini) == [(True, "")] and checks(big) == [(True, "")]
    assert checks(gone) == [
        (False, f"The provider {provider.name!r} answers, but its model list does not include 'retired-model'.")
    ]
    assert all(check.latency_ms is not None and not check.paid for check in HealthCheck.objects.all())
    # Free: one model list for the three deployments, and not one completion.
    assert served(fake_upstream) == {"/v1/models": 1}
    provider.refresh_from_db()
    assert provider.last_health_status == HealthStatus.OK and provider.last_health_at is not None


def test_a_paid_probe_is_a_one_token_completion_of_that_deployment_only(fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    free = ModelFactory(provider=provider, upstream_id="fake-gpt-4o-mini").deployments.get()
    paid = ModelFactory(provider=provider, upstream_id="fake-gpt-4o").deployments.get()
    Deployment.objects.filter(pk=paid.pk).update(paid_health_probe=True)

    providers_health_check_all.delay().get()

    completions = logged(fake_upstream, "/v1/chat/completions")
    assert [(r["body"]["model"], r["body"]["max_tokens"]) for r in completions] == [("fake-gpt-4o", 1)]
    assert served(fake_upstream) == {"/v1/models": 1, "/v1/chat/completions": 1}
    assert [(c.ok, c.paid) for c in free.health_checks.all()] == [(True, False)]
    assert [(c.ok, c.paid) for c in paid.health_checks.all()] == [(True, True)]


def test_a_paid_probe_of_an_embedding_model_embeds_one_word(fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    model = ModelFactory(provider=provider, upstream_id="fake-embed", mode=ModelMode.EMBEDDING)
    Deployment.objects.filter(model=model).update(paid_health_probe=True)

    providers_health_check_all.delay().get()

    assert served(fake_upstream) == {"/v1/models": 1, "/v1/embeddings": 1}
    assert [(c.ok, c.paid) for c in HealthCheck.objects.all()] == [(True, True)]


def test_a_failing_probe_opens_the_breaker_for_every_process_and_a_passing_one_closes_it(fake_upstream, home):
    east = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    west = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    model = ModelFactory(provider=east, upstream_id="fake-gpt-4o-mini")
    flaky = DeploymentFactory(model=model, provider=west, upstream_id="fake-gpt-4o-mini")

    def routed() -> set[str]:
        return {d.provider.name for d in route_candidates(resolved_model(model))}

    assert routed() == {east.name, west.name}
    set_fault(west, "503")
    providers_health_check_all.delay().get()
    assert routed() == {east.name}  # one failing probe is enough: no request has to fail to find out
    state = breaker_state(flaky.pk)
    assert state.state == OPEN and state.shared == (home == "redis")  # shared: what every process reads

    set_fault(west, None)
    providers_health_check_all.delay().get()
    assert routed() == {east.name, west.name}
    assert breaker_state(flaky.pk).state == CLOSED


def test_a_passing_probe_closes_a_half_open_breaker_and_leaves_a_closed_ones_count(fake_upstream, settings):
    settings.REDIS_URL = ""
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    tripped = ModelFactory(provider=provider).deployments.get()
    wobbly = ModelFactory(provider=provider).deployments.get()
    start = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    with time_machine.travel(start, tick=False) as clock:
        for _ in range(settings.LLMHUB_BREAKER_FAILURES):  # requests failed: the breaker opened
            breaker_record(tripped.pk, ok=False)
        breaker_record(wobbly.pk, ok=False)
        clock.shift(timedelta(seconds=settings.LLMHUB_BREAKER_COOLDOWN_SECONDS + 1))
        assert breaker_state(tripped.pk).state == HALF_OPEN

        providers_health_check_all.delay().get()

        assert breaker_state(tripped.pk).state == CLOSED
        wobbly_state = breaker_state(wobbly.pk)
        assert wobbly_state.state == CLOSED and wobbly_state.failures == 1


def test_an_unreachable_provider_fails_its_deployments(fake_upstream):
    provider = ProviderFactory(base_url=f"http://127.0.0.1:{free_port()}/v1")
    deployment = ModelFactory(provider=provider).deployments.get()

    assert providers_health_check_all.delay().get() == {provider.name: False}

    ((ok, error),) = checks(deployment)
    assert not ok and "could not reach" in error
    assert Provider.objects.get(pk=provider.pk).last_health_status == HealthStatus.FAILING


def test_the_key_quoted_back_by_the_provider_never_reaches_a_health_check(fake_upstream):
    # The fake quotes an unknown fault name back in its error; here the name is the provider's key.
    provider = ProviderFactory(
        base_url=fake_upstream.base_url + "/v1", api_key=KEY, extra_headers={"x-fake-fault": KEY}
    )
    listed = ModelFactory(provider=provider).deployments.get()
    paid = ModelFactory(provider=provider, upstream_id="fake-gpt-4o").deployments.get()
    Deployment.objects.filter(pk=paid.pk).update(paid_health_probe=True)

    providers_health_check_all.delay().get()

    stored = [check.error for check in HealthCheck.objects.all()] + [Provider.objects.get().last_health_error]
    assert len(stored) == 3 and all("Unknown fake fault" in error for error in stored)
    assert not any(KEY in error or KEY[-12:] in error for error in stored)
    assert listed.health_checks.get().ok is False and paid.health_checks.get().paid


def test_disabled_deployments_models_and_providers_are_not_probed(fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    off = ModelFactory(provider=provider).deployments.get()
    Deployment.objects.filter(pk=off.pk).update(enabled=False)
    ModelFactory(provider=provider, enabled=False)
    ModelFactory(provider=ProviderFactory(base_url=fake_upstream.base_url + "/v1", enabled=False))

    providers_health_check_all.delay().get()

    assert not HealthCheck.objects.exists()


def test_a_provider_that_lists_nothing_is_healthy_while_it_answers(empty_lister):
    deployment = ModelFactory(provider=ProviderFactory(base_url=empty_lister)).deployments.get()

    providers_health_check_all.delay().get()

    assert checks(deployment) == [(True, "")]


def test_azure_deployments_are_not_looked_for_in_the_model_list(fake_upstream):
    # Azure lists the models a resource may deploy, not the names of its deployments.
    provider = ProviderFactory(
        kind=ProviderKind.AZURE_OPENAI, base_url=fake_upstream.base_url, api_version="2024-10-21"
    )
    deployment = ModelFactory(provider=provider, upstream_id="my-gpt-4o-deployment").deployments.get()

    providers_health_check_all.delay().get()

    assert checks(deployment) == [(True, "")]
    assert served(fake_upstream) == {"/openai/models": 1}


def test_health_checks_are_kept_for_a_number_of_rows_and_of_days(fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    busy = ModelFactory(provider=provider).deployments.get()
    quiet = ModelFactory(provider=ProviderFactory(enabled=False)).deployments.get()
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    for minutes in range(1, 6):
        HealthCheck.objects.create(deployment=busy, checked_at=now - timedelta(minutes=minutes), ok=True)
    HealthCheck.objects.create(deployment=quiet, checked_at=now - timedelta(days=3, minutes=1), ok=False)
    HealthCheck.objects.create(deployment=quiet, checked_at=now - timedelta(days=2, minutes=59), ok=True)

    with (
        time_machine.travel(now, tick=False),
        override_settings(LLMHUB_HEALTH_CHECKS_KEPT=3, LLMHUB_HEALTH_CHECK_RETENTION_DAYS=3),
    ):
        providers_health_check_all.delay().get()

    kept = [check.checked_at for check in busy.health_checks.order_by("-checked_at")]
    assert kept == [now, now - timedelta(minutes=1), now - timedelta(minutes=2)]
    assert [check.ok for check in quiet.health_checks.all()] == [True]  # the older one is past 3 days


def test_pruning_keeps_the_newest_rows_of_each_deployment():
    deployment = ModelFactory().deployments.get()
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    same_instant = [HealthCheck.objects.create(deployment=deployment, checked_at=now, ok=True) for _ in range(4)]

    with time_machine.travel(now, tick=False), override_settings(LLMHUB_HEALTH_CHECKS_KEPT=2):
        assert health_checks_prune() == 2

    assert sorted(deployment.health_checks.values_list("pk", flat=True)) == [c.pk for c in same_instant[2:]]


def test_a_round_goes_on_past_a_provider_that_cannot_be_checked(fake_upstream):
    good = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    broken = ProviderFactory(kind=ProviderKind.VLLM, base_url=fake_upstream.base_url + "/v1")
    ModelFactory(provider=good)
    unchecked = ModelFactory(provider=broken).deployments.get()

    with override_settings(LLMHUB_ADAPTERS={"openai_compatible": "providers.adapters.openai.OpenAIAdapter"}):
        rounds = health_check_round(providers=[good, broken])

    assert rounds[0].result.ok and len(rounds[0].deployments) == 1
    assert isinstance(rounds[1].result, Exception) and rounds[1].deployments == []
    assert not unchecked.health_checks.exists()


@pytest.mark.django_db(transaction=True)
def test_a_deployment_deleted_while_the_round_runs_leaves_the_other_providers_checked(fake_upstream):
    """An admin deletes a deployment while the round waits for the providers' answers (a round lasts as long as
    the slowest provider's timeout). Its probe's row broke its foreign key, and the round stopped there: the
    providers after it got no health check, no breaker or incident moved, nothing was pruned and the task
    failed. The deleted deployment's probe is dropped, and the round goes on."""
    from django.db import connection

    doomed: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                Deployment.objects.filter(pk=doomed["pk"]).delete()  # the admin, while this provider answers
            finally:
                connection.close()
            body = json.dumps({"object": "list", "data": [{"id": "doomed-model", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        first = ProviderFactory(name="a-first", base_url=f"http://127.0.0.1:{port}/v1")
        second = ProviderFactory(name="b-second", base_url=fake_upstream.base_url + "/v1")
        doomed["pk"] = ModelFactory(provider=first, upstream_id="doomed-model").deployments.get().pk
        kept = ModelFactory(provider=second, upstream_id="fake-gpt-4o").deployments.get()

        assert providers_health_check_all() == {"a-first": True, "b-second": True}
    finally:
        server.shutdown()
        server.server_close()

    assert not Deployment.objects.filter(pk=doomed["pk"]).exists()
    assert checks(kept) == [(True, "")]
    second.refresh_from_db()
    assert second.last_health_status == HealthStatus.OK


def test_a_provider_that_cannot_be_loaded_or_checked_shows_failing_and_fails_the_run(fake_upstream):
    """One provider's key was written under an encryption key since dropped (its row cannot be loaded), another's
    adapter raises: both were only logged, their rows kept their old "OK" and the run was recorded a success.
    Now each row shows the failure as a failed check would, the run is recorded as failed, and the other
    provider is checked all the same."""
    from django.db import connection

    from billing.models import TaskRun

    good = ProviderFactory(name="a-good", base_url=fake_upstream.base_url + "/v1")
    unloadable = ProviderFactory(name="b-unloadable", base_url=fake_upstream.base_url + "/v1", api_key=KEY)
    broken = ProviderFactory(name="c-broken", kind=ProviderKind.VLLM, base_url=fake_upstream.base_url + "/v1")
    for provider in (good, unloadable, broken):
        ModelFactory(provider=provider)
    earlier = datetime(2026, 1, 1, tzinfo=UTC)
    Provider.objects.update(last_health_status=HealthStatus.OK, last_health_at=earlier, last_health_latency_ms=5)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE providers_provider SET api_key = %s WHERE id = %s", ["gAAAAABnot-a-token", unloadable.pk]
        )

    with override_settings(LLMHUB_ADAPTERS={"openai_compatible": "providers.adapters.openai.OpenAIAdapter"}):
        run = providers_health_check_all.apply()

    assert run.failed()
    task_run = TaskRun.objects.get(task="providers.tasks.providers_health_check_all")
    assert not task_run.succeeded and task_run.error_class == "ProvidersNotCheckedError"
    rows = {
        name: (status, error, at > earlier, latency)
        for name, status, error, at, latency in Provider.objects.values_list(
            "name", "last_health_status", "last_health_error", "last_health_at", "last_health_latency_ms"
        )
    }
    assert rows["a-good"][0] == HealthStatus.OK and rows["a-good"][2]
    for name in ("b-unloadable", "c-broken"):
        status, error, stamped, latency = rows[name]
        assert (status, stamped, latency) == (HealthStatus.FAILING, True, None), name
        assert error.startswith("llmhub could not check this provider"), error
        assert KEY not in error
    assert "could not be loaded" in rows["b-unloadable"][1]
    assert HealthCheck.objects.filter(deployment__provider=good).count() == 1


def test_a_model_missing_from_the_providers_list_is_kept_on_the_deployment_until_it_is_found_again(fake_upstream):
    """The round keeps since when the provider's model list lacks a deployment's upstream id (a catalog
    mistake), in the catalog snapshot the request path reads (this process's cached copy dropped at once); a
    round that cannot tell (the provider failing) leaves it, and one that finds the id again clears it."""
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    model = ModelFactory(provider=provider, upstream_id="fake-gpt-typo")
    deployment = model.deployments.get()
    fine = ModelFactory(provider=provider, upstream_id="fake-gpt-4o").deployments.get()
    before = async_to_sync(model_resolve)(model.name)  # cached, as a request would have it
    assert before.deployments[0].upstream_model_missing_since is None
    first = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    with time_machine.travel(first, tick=False) as clock:
        health_check_round(providers=[provider])
        assert async_to_sync(model_resolve)(model.name).deployments[0].upstream_model_missing_since == first

        clock.shift(timedelta(minutes=5))
        health_check_round(providers=[provider])  # still missing: since the first round that saw it
        set_fault(provider, "503")
        clock.shift(timedelta(minutes=5))
        health_check_round(providers=[provider])  # cannot tell: kept

        deployment.refresh_from_db()
        assert deployment.upstream_model_missing_since == first
        assert Deployment.objects.get(pk=fine.pk).upstream_model_missing_since is None

        set_fault(provider, None)
        Deployment.objects.filter(pk=deployment.pk).update(upstream_id="fake-gpt-4o-mini")  # the admin's fix
        clock.shift(timedelta(minutes=5))
        health_check_round(providers=[provider])

    deployment.refresh_from_db()
    assert deployment.upstream_model_missing_since is None
    assert async_to_sync(model_resolve)(model.name).deployments[0].upstream_model_missing_since is None


def test_a_paid_probe_answered_404_marks_the_model_missing_and_one_answered_clears_it(fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    deployment = ModelFactory(provider=provider, upstream_id="fake-gpt-typo").deployments.get()
    Deployment.objects.filter(pk=deployment.pk).update(paid_health_probe=True)
    fake_upstream.set_fault("404", models=["fake-gpt-typo"])
    try:
        health_check_round(providers=[provider])
    finally:
        fake_upstream.set_fault(None)

    deployment.refresh_from_db()
    assert deployment.upstream_model_missing_since is not None
    assert deployment.health_checks.get().paid

    health_check_round(providers=[provider])

    deployment.refresh_from_db()
    assert deployment.upstream_model_missing_since is None


def test_an_upstream_id_corrected_since_the_round_is_not_taken_for_missing(fake_upstream, admin_client):
    """What the round found missing is that id: once an admin corrects it (any way: the admin, the catalog file,
    an update), neither the request path nor the admin says the new id is missing, before any round has run."""
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    model = ModelFactory(provider=provider, upstream_id="fake-gpt-typo")
    deployment = model.deployments.get()
    health_check_round(providers=[provider])
    page = f"/admin/providers/deployment/{deployment.pk}/change/"
    assert "upstream model missing since" in admin_client.get(page).content.decode()

    Deployment.objects.filter(pk=deployment.pk).update(upstream_id="fake-gpt-4o")

    assert async_to_sync(model_resolve)(model.name).deployments[0].upstream_model_missing_since is None
    assert "upstream model missing since" not in admin_client.get(page).content.decode()
    assert "upstream model missing" not in admin_client.get("/admin/providers/deployment/").content.decode()
