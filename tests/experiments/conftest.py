"""Shared experiment factories: a running A/B experiment on a public model served by the fake upstream.

``ab_experiment(...)`` (the fixture is a factory) builds, on a fresh public model whose deployments all
point at the fake upstream:

- the model (``ab.model``) with two deployments, ``control`` (upstream id ``fake-control``) and
  ``treatment`` (upstream id ``fake-treatment``), so the fake upstream's request log says which one served;
- an experiment (``ab.experiment``, status running unless told) with the variants ``control`` (the
  control deployment) and ``treatment`` (by default the treatment deployment; ``treatment_model=True``
  makes it another public model, ``ab.target_model``, upstream id ``fake-other``), each with the
  allocation given in percent; what is left is the untouched share;
- the layout built from the allocations as ``experiments.layout`` builds it.

The test asks for the database itself (``db``, ``transactional_db`` or a live server).

``operator_signed_in()`` is a test client signed in as an operator; ``tagline_versions()`` makes two versions
of one prompt template whose required variables differ, which no two variants may run against each other."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client

from accounts.roles import Role, role_set
from experiments.assignment import assignment_cache
from experiments.layout import layout_rebalance
from experiments.models import Experiment, ExperimentStatus, Variant
from prompts.models import PromptTemplate, PromptVersion
from prompts.services import prompt_version_create
from providers.models import CatalogModel, Deployment, Provider
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UserFactory


@dataclass
class AB:
    experiment: Experiment
    model: CatalogModel
    control: Variant
    treatment: Variant
    control_deployment: Deployment
    treatment_deployment: Deployment
    target_model: CatalogModel | None = None

    def refresh(self) -> AB:
        self.experiment.refresh_from_db()
        self.control.refresh_from_db()
        self.treatment.refresh_from_db()
        return self

    def treatment_served_by(self, provider: Provider) -> None:
        """The treatment's deployment, or every deployment of its other model, moved to ``provider``."""
        if self.target_model is not None:
            self.target_model.deployments.update(provider=provider)
        else:
            self.treatment_deployment.provider = provider
            self.treatment_deployment.save()


@pytest.fixture
def ab_experiment(fake_upstream) -> Iterator[Callable[..., AB]]:
    def make(
        *,
        name: str = "ab-test",
        model_name: str = "ab-model",
        control: Decimal | str | int = 50,
        treatment: Decimal | str | int = 50,
        treatment_model: bool = False,
        overrides: dict[str, Any] | None = None,
        status: str = ExperimentStatus.RUNNING,
        salt: str | None = None,
    ) -> AB:
        provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
        model = ModelFactory(name=model_name, provider=provider, upstream_id="fake-control")
        control_deployment = model.deployments.get()
        control_deployment.name = "control"
        control_deployment.save()
        treatment_deployment = DeploymentFactory(
            model=model, provider=provider, upstream_id="fake-treatment", name="treatment"
        )
        target_model = (
            ModelFactory(name=f"{model_name}-other", provider=provider, upstream_id="fake-other")
            if treatment_model
            else None
        )
        experiment = Experiment.objects.create(name=name, model=model, **({"salt": salt} if salt is not None else {}))
        control_variant = Variant.objects.create(
            experiment=experiment,
            name="control",
            is_control=True,
            deployment=control_deployment,
            allocation=Decimal(control),
            position=0,
        )
        treatment_variant = Variant.objects.create(
            experiment=experiment,
            name="treatment",
            deployment=None if treatment_model else treatment_deployment,
            target_model=target_model,
            overrides=overrides or {},
            allocation=Decimal(treatment),
            position=1,
        )
        experiment.layout = layout_rebalance(
            [],
            {
                control_variant.pk: int(Decimal(control) * 100),
                treatment_variant.pk: int(Decimal(treatment) * 100),
            },
        )
        experiment.status = status
        experiment.save()
        assignment_cache.invalidate()
        return AB(
            experiment=experiment,
            model=model,
            control=control_variant,
            treatment=treatment_variant,
            control_deployment=control_deployment,
            treatment_deployment=treatment_deployment,
            target_model=target_model,
        )

    yield make
    assignment_cache.invalidate()


def tagline_versions() -> tuple[PromptVersion, PromptVersion]:
    """The template ``tagline``'s versions 1 (requires ``product``) and 2 (requires ``product`` and ``audience``)."""
    template = PromptTemplate.objects.create(slug="tagline")
    v1 = prompt_version_create(
        template=template,
        messages=[{"role": "user", "content": "A tagline for {{ product }}."}],
        variables=[{"name": "product", "type": "string"}],
    )
    v2 = prompt_version_create(
        template=template,
        messages=[{"role": "user", "content": "A tagline for {{ product }}, for {{ audience }}."}],
        variables=[{"name": "product", "type": "string"}, {"name": "audience", "type": "string"}],
    )
    return v1, v2


def operator_signed_in() -> Client:
    """A test client signed in as an operator (staff through the role, with the experiments app's model
    permissions)."""
    user = UserFactory(username="olga")
    role_set(user, Role.OPERATOR)
    client = Client()
    client.force_login(user)
    return client
