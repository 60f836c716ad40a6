"""factory_boy factories for the rows most tests need."""

from __future__ import annotations

from decimal import Decimal

import factory
from django.contrib.auth import get_user_model

from billing.models import Endpoint, UsageRecord, UsageStatus
from billing.services.ledger import _spool_line
from billing.services.ledger_rows import UsageData
from providers.models import CatalogModel, Deployment, Provider, ProviderKind


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    password = factory.django.Password("pw-for-tests-123")


class ProviderFactory(factory.django.DjangoModelFactory):
    """A provider pointing at the fake upstream; pass ``base_url=fake_upstream.base_url + '/v1'``."""

    class Meta:
        model = Provider

    name = factory.Sequence(lambda n: f"fake-openai-{n}")
    kind = ProviderKind.OPENAI_COMPATIBLE
    base_url = "http://127.0.0.1:9/v1"
    api_key = "sk-fake-upstream-key-0000000000000000"
    timeout_seconds = Decimal("10.0")


_DEPLOYMENT_FIELDS = (
    "provider",
    "upstream_id",
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "cache_write_1h_per_mtok",
)


class ModelFactory(factory.django.DjangoModelFactory):
    """A public model with one deployment: ``provider``, ``upstream_id`` and the prices go to the deployment
    (as a catalog row held them before deployments)."""

    class Meta:
        model = CatalogModel

    name = factory.Sequence(lambda n: f"model-{n}")
    provider = factory.SubFactory(ProviderFactory)
    upstream_id = "fake-gpt-4o-mini"
    input_per_mtok = Decimal("0.15")
    output_per_mtok = Decimal("0.60")
    context_window = 128_000

    @classmethod
    def _create(cls, model_class: type[CatalogModel], *args: object, **kwargs: object) -> CatalogModel:
        deployment = {name: kwargs.pop(name) for name in _DEPLOYMENT_FIELDS if name in kwargs}
        model = model_class.objects.create(*args, **kwargs)
        Deployment.objects.create(model=model, **deployment)
        return model


class DeploymentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Deployment

    model = factory.SubFactory(ModelFactory)
    provider = factory.SubFactory(ProviderFactory)
    upstream_id = "fake-gpt-4o-mini"
    input_per_mtok = Decimal("0.15")
    output_per_mtok = Decimal("0.60")


class UsageRecordFactory(factory.django.DjangoModelFactory):
    """A ledger row as the pipeline writes it; pass ``user``, ``api_key``, ``created_at`` as a test needs."""

    class Meta:
        model = UsageRecord

    request_id = factory.Sequence(lambda n: f"req-test-{n:08d}")
    user = factory.SubFactory(UserFactory)
    provider_name = "fake-openai"
    model_name = "gpt-test"
    endpoint = Endpoint.REST
    prompt_tokens = 10
    completion_tokens = 5
    cost = Decimal("0.0000045")
    duration_ms = 120
    status = UsageStatus.OK


class UsageDataFactory(factory.Factory):
    """A ledger row as the ledger's writer holds it before the database has it (``UsageData``): what an outage
    spools (``spooled_line``). Pass ``user_id``, ``api_key_id``, ``cost``, ``created_at`` as a test needs."""

    class Meta:
        model = UsageData

    request_id = factory.Sequence(lambda n: f"req-spooled-{n:08d}")
    endpoint = Endpoint.REST
    stream = False
    status = UsageStatus.OK
    provider_name = "fake-openai"
    model_name = "gpt-test"
    prompt_tokens = 10
    completion_tokens = 20
    cost = Decimal("0.0000045")
    duration_ms = 120


def spooled_line(**fields: object) -> str:
    """A ledger row as the spool holds it, written by the ledger's own ``_spool_line`` (with no admission to
    settle): a row of ``UsageDataFactory`` with ``fields``."""
    return _spool_line(UsageDataFactory.build(**fields), None)


def provider_admin_form(provider, **overrides: object) -> dict[str, object]:
    """The Provider admin's change form as a browser posts it for ``provider`` (``api_key`` empty: kept),
    with ``overrides``; an override of None leaves that field out."""
    data = {
        "name": provider.name,
        "kind": provider.kind,
        "enabled": "on",
        "base_url": provider.base_url,
        "api_key": "",
        "organization": provider.organization,
        "extra_headers": "{}",
        "timeout_seconds": str(provider.timeout_seconds),
        "byok": provider.byok,
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}
