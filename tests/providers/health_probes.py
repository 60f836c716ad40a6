"""What the health-check and incident tests share: a provider's standing fault, and breakers closed again
after a test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from providers.models import Deployment, Provider
from providers.routing.breakers import breaker_reset


def set_fault(provider: Provider, fault: str | None) -> None:
    """The fake upstream answers every request of ``provider`` with this fault (its ``x-fake-fault`` header)."""
    provider.extra_headers = {"x-fake-fault": fault} if fault else {}
    provider.save()


@pytest.fixture
def breakers_closed_after() -> Iterator[None]:
    """The probes open breakers, which outlive the test (in this process's memory): closed again before the
    rows go, so that a later test's deployment under a reused id starts with a closed breaker."""
    yield
    for deployment_id in Deployment.objects.values_list("pk", flat=True):
        breaker_reset(deployment_id)
