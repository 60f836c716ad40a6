"""Services and tasks of the providers app, against the fake upstream over real HTTP."""

from __future__ import annotations

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from celery.exceptions import Retry
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from llmhub.testing.fake_upstream import EMBEDDING_MODELS, MODELS, FakeUpstream
from providers.adapters.registry import adapters_close_all
from providers.exceptions import ProviderAuthenticationError
from providers.models import CatalogModel, Deployment, HealthStatus, Provider, ProviderKind
from providers.services.health import aprovider_health_check, provider_health_check, providers_health_check
from providers.services.model_import import provider_import_models
from providers.tasks import (
    provider_health_check_task,
    providers_health_check_all,
    providers_rotate_encryption_task,
)
from tests.conftest import free_port
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory

WRONG_KEY = "sk-wrong-key-for-the-fake-0000000000000"
# What an OpenAI-compatible provider's model list names (Anthropic's: MODELS only).
UPSTREAM_IDS = sorted(model_id for model_id, _ in MODELS + EMBEDDING_MODELS)


@pytest.fixture(scope="module")
def locked_upstream():
    """A fake upstream that refuses every key but its own."""
    server = FakeUpstream(api_key="sk-the-right-key-1111111111111111").start()
    yield server
    server.stop()


def unreachable_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


# Health checks ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_health_check_ok_is_stored(fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")

    result = provider_health_check(provider=provider)

    assert result.ok and result.models_seen == len(UPSTREAM_IDS) and result.error == ""
    provider.refresh_from_db()
    assert provider.last_health_status == HealthStatus.OK
    assert provider.last_health_latency_ms == result.latency_ms
    assert provider.last_health_at is not None and provider.last_health_error == ""


@pytest.mark.django_db
def test_health_check_of_an_anthropic_provider(fake_upstream):
    provider = ProviderFactory(kind=ProviderKind.ANTHROPIC, base_url=fake_upstream.base_url)

    result = provider_health_check(provider=provider)

    assert result.ok and result.models_seen == len(MODELS)
    assert Provider.objects.get(pk=provider.pk).last_health_status == HealthStatus.OK


@pytest.mark.django_db
@pytest.mark.parametrize("kind", [ProviderKind.OPENAI_COMPATIBLE, ProviderKind.ANTHROPIC])
def test_health_check_refused_key_stores_the_mapped_error_without_the_key(locked_upstream, kind):
    suffix = "/v1" if kind != ProviderKind.ANTHROPIC else ""
    provider = ProviderFactory(kind=kind, base_url=locked_upstream.base_url + suffix, api_key=WRONG_KEY)
    updated_at = Provider.objects.get(pk=provider.pk).updated_at

    result = provider_health_check(provider=provider)

    assert not result.ok
    stored = Provider.objects.get(pk=provider.pk)
    assert stored.last_health_status == HealthStatus.FAILING
    assert "refused the gateway's credentials" in stored.last_health_error
    assert WRONG_KEY not in stored.last_health_error and WRONG_KEY[-12:] not in stored.last_health_error
    assert stored.updated_at == updated_at  # a health check is not a configuration change


@pytest.mark.django_db
def test_health_check_of_an_unreachable_provider():
    provider = ProviderFactory(base_url=unreachable_url())

    result = provider_health_check(provider=provider)

    assert not result.ok and "could not reach" in result.error
    assert Provider.objects.get(pk=provider.pk).last_health_status == HealthStatus.FAILING


@pytest.mark.django_db
def test_several_providers_are_checked_each_on_its_own(fake_upstream):
    good = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    down = ProviderFactory(base_url=unreachable_url())
    broken = ProviderFactory(kind=ProviderKind.VLLM, base_url=fake_upstream.base_url + "/v1")
    adapters = {"openai_compatible": "providers.adapters.openai.OpenAIAdapter"}  # none for vllm

    with override_settings(LLMHUB_ADAPTERS=adapters):
        outcomes = providers_health_check(providers=[good, down, broken])

    assert outcomes[0].ok and not outcomes[1].ok
    assert isinstance(outcomes[2], ImproperlyConfigured)
    statuses = dict(Provider.objects.values_list("name", "last_health_status"))
    assert statuses == {good.name: HealthStatus.OK, down.name: HealthStatus.FAILING, broken.name: HealthStatus.UNKNOWN}


@pytest.mark.django_db(transaction=True)
async def test_async_health_check_uses_the_pooled_adapter(fake_upstream):
    provider = await sync_to_async(ProviderFactory)(base_url=fake_upstream.base_url + "/v1")
    try:
        first = await aprovider_health_check(provider=provider)
        second = await aprovider_health_check(provider=provider)
    finally:
        await adapters_close_all()

    assert first.ok and second.ok
    assert provider.last_health_status == HealthStatus.OK
    stored = await Provider.objects.aget(pk=provider.pk)
    assert stored.last_health_status == HealthStatus.OK and stored.last_health_at == provider.last_health_at


# Tasks --------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_health_check_all_checks_enabled_providers_only(fake_upstream):
    enabled = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    down = ProviderFactory(base_url=unreachable_url())
    disabled = ProviderFactory(base_url=fake_upstream.base_url + "/v1", enabled=False)

    healthy = providers_health_check_all.delay().get()

    assert healthy == {enabled.name: True, down.name: False}
    assert Provider.objects.get(pk=disabled.pk).last_health_status == HealthStatus.UNKNOWN


@pytest.mark.django_db
def test_health_check_all_goes_on_past_a_row_that_cannot_be_loaded(fake_upstream):
    lost_key = Fernet.generate_key().decode()
    with override_settings(FIELD_ENCRYPTION_KEYS=[lost_key]):
        unreadable = ProviderFactory(name="a-unreadable", base_url=fake_upstream.base_url + "/v1")
    readable = ProviderFactory(name="b-readable", base_url=fake_upstream.base_url + "/v1")

    run = providers_health_check_all.delay()
    assert run.failed() and type(run.result).__name__ == "ProvidersNotCheckedError"  # the others checked first
    assert Provider.objects.get(pk=readable.pk).last_health_status == HealthStatus.OK
    assert Provider.objects.defer("api_key").get(pk=unreadable.pk).last_health_status == HealthStatus.FAILING


@pytest.mark.django_db
def test_health_check_task_for_one_provider(fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")

    assert provider_health_check_task.delay(provider.pk).get() is True
    assert provider_health_check_task.delay(provider.pk + 1000).get() is None  # deleted meanwhile: nothing to do
    assert Provider.objects.get(pk=provider.pk).last_health_status == HealthStatus.OK


@pytest.mark.django_db
def test_health_check_task_retries_unexpected_errors_then_gives_up(fake_upstream):
    provider = ProviderFactory(kind=ProviderKind.VLLM, base_url=fake_upstream.base_url + "/v1")

    with override_settings(LLMHUB_ADAPTERS={}):
        with pytest.raises(Retry) as excinfo:
            provider_health_check_task.apply(args=[provider.pk], throw=True)
        assert isinstance(excinfo.value.exc, ImproperlyConfigured) and 0 <= excinfo.value.when <= 15
        # Run eagerly, the retries follow at once; after the last one the error is the task's result.
        result = provider_health_check_task.apply(args=[provider.pk])
    assert result.failed() and isinstance(result.result, ImproperlyConfigured)
    assert Provider.objects.get(pk=provider.pk).last_health_status == HealthStatus.UNKNOWN


@pytest.fixture
def jitter_draws(monkeypatch):
    """Celery's full jitter draws each countdown from 0 up to the backoff; recorded, and the top one taken."""
    import celery.utils.time

    draws = []

    def randrange(stop):
        draws.append(stop - 1)
        return stop - 1

    monkeypatch.setattr(celery.utils.time.random, "randrange", randrange)
    return draws


@pytest.mark.django_db
def test_health_check_task_backs_off_exponentially_with_jitter(fake_upstream, jitter_draws):
    provider = ProviderFactory(kind=ProviderKind.VLLM, base_url=fake_upstream.base_url + "/v1")

    countdowns = []
    with override_settings(LLMHUB_ADAPTERS={}):
        for retries in range(3):
            with pytest.raises(Retry) as excinfo:
                provider_health_check_task.apply(args=[provider.pk], retries=retries, throw=True)
            countdowns.append(excinfo.value.when)
    assert countdowns == jitter_draws == [15, 30, 60]  # each drawn from 0 to that, not a fixed 60 s


@pytest.mark.django_db
def test_rotation_task_backs_off_exponentially_up_to_its_cap_and_does_not_retry_a_lost_key(jitter_draws):
    ProviderFactory(api_key="sk-one-0000000000000000")

    countdowns = []
    with override_settings(LLMHUB_ENCRYPTION_ROTATION_BATCH_SIZE=-1):  # the database query refuses it
        for retries in range(5):
            with pytest.raises(Retry) as excinfo:
                providers_rotate_encryption_task.apply(retries=retries, throw=True)
            countdowns.append(excinfo.value.when)
    assert countdowns == jitter_draws == [60, 120, 240, 480, 900]

    lost = Fernet.generate_key().decode()
    with override_settings(FIELD_ENCRYPTION_KEYS=[lost]):
        ProviderFactory(api_key="sk-under-a-key-nobody-has-0123456789")
    result = providers_rotate_encryption_task.apply()
    assert result.failed() and isinstance(result.result, ImproperlyConfigured)  # needs a person, not a retry


@pytest.mark.django_db
def test_rotation_task_reports_rewritten_values():
    ProviderFactory(api_key="sk-one-0000000000000000")
    ProviderFactory(api_key="")
    assert providers_rotate_encryption_task.delay().get() == 1


# Model import -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_import_creates_disabled_unpriced_models_once(fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")

    result = provider_import_models(provider=provider)

    assert sorted(result.created) == UPSTREAM_IDS and result.already_known == 0 and result.skipped == ()
    rows = CatalogModel.objects.filter(deployments__provider=provider).order_by("name")
    assert [row.name for row in rows] == UPSTREAM_IDS
    for row in rows:
        [deployment] = row.deployments.all()
        assert row.name == deployment.upstream_id and not row.enabled and row.alias_of is None
        assert deployment.provider == provider and deployment.name == provider.name and deployment.enabled
        assert deployment.input_per_mtok == Decimal("0") and deployment.output_per_mtok == Decimal("0")

    again = provider_import_models(provider=provider)
    assert again.created == () and again.already_known == len(UPSTREAM_IDS)
    assert Deployment.objects.filter(provider=provider).count() == len(UPSTREAM_IDS) == CatalogModel.objects.count()


@pytest.mark.django_db
def test_an_upstream_id_deployed_under_another_public_name_is_already_known(fake_upstream):
    provider = ProviderFactory(name="fresh", base_url=fake_upstream.base_url + "/v1")
    other = ProviderFactory(name="other")
    # fake-gpt-4o is served by this provider as a second deployment of a model with another name.
    served = ModelFactory(name="house-gpt", provider=other, upstream_id="fake-gpt-4o")
    DeploymentFactory(model=served, provider=provider, upstream_id="fake-gpt-4o")

    result = provider_import_models(provider=provider)

    assert "fake-gpt-4o" not in result.created and "fresh/fake-gpt-4o" not in result.created
    assert result.already_known == 1 and len(result.created) == len(UPSTREAM_IDS) - 1
    assert served.deployments.count() == 2


@pytest.mark.django_db
def test_import_prefixes_names_taken_by_another_provider(fake_upstream):
    other = ProviderFactory(name="other")
    ModelFactory(name="fake-gpt-4o", provider=other, upstream_id="fake-gpt-4o")
    provider = ProviderFactory(name="fresh", base_url=fake_upstream.base_url + "/v1")
    ModelFactory(name="fresh/fake-o3-mini", provider=other, upstream_id="something-else")
    ModelFactory(name="fake-o3-mini", provider=other, upstream_id="fake-o3-mini")

    result = provider_import_models(provider=provider)

    assert "fresh/fake-gpt-4o" in result.created and "fake-gpt-4o" not in result.created
    assert result.skipped == ("fake-o3-mini",)  # both the plain and the prefixed name are taken
    assert CatalogModel.objects.get(name="fresh/fake-gpt-4o").deployments.get().provider == provider
    assert CatalogModel.objects.get(name="fake-gpt-4o").deployments.get().provider == other


@pytest.mark.django_db
def test_import_from_an_anthropic_provider(fake_upstream):
    provider = ProviderFactory(kind=ProviderKind.ANTHROPIC, base_url=fake_upstream.base_url)

    result = provider_import_models(provider=provider)

    assert sorted(result.created) == sorted(model_id for model_id, _ in MODELS)


@pytest.mark.django_db
def test_import_refused_by_the_provider_raises_and_creates_nothing(locked_upstream):
    provider = ProviderFactory(base_url=locked_upstream.base_url + "/v1", api_key=WRONG_KEY)

    with pytest.raises(ProviderAuthenticationError) as excinfo:
        provider_import_models(provider=provider)

    assert WRONG_KEY not in excinfo.value.message
    assert not CatalogModel.objects.exists() and not Deployment.objects.exists()
