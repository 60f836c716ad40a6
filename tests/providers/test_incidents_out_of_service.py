"""A deployment the health checks found down, taken out of service by an admin while its incident is open: the
operator's first answer to a provider's outage is to disable it (or the deployment, or its model). The health round
probes only what is in service, so no probe ever closed that incident: a "down" page that never resolved. The next
round closes it, told once as closed, not recovered, saying why; and opens none while it stays out of service.
Probes against the fake upstream over real HTTP; the committed transactions let the alerts go out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core import mail

from billing.models import OpsAlertKind, OpsAlertRule
from billing.services.ops_alerts import ops_alerts_evaluate
from providers.models import CatalogModel, Deployment, Incident, Provider
from providers.tasks import providers_health_check_all
from tests.factories import ModelFactory, ProviderFactory
from tests.providers.health_probes import breakers_closed_after, set_fault  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("breakers_closed_after")]

START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("taken_out", "because"),
    [
        ("provider", "its provider was disabled by an admin"),
        ("deployment", "the deployment was disabled by an admin"),
        ("model", "its model was disabled by an admin"),
    ],
)
def test_a_deployment_down_taken_out_of_service_has_its_incident_closed_once_as_no_recovery(
    fake_upstream, webhook, settings, taken_out, because
):
    settings.ADMINS = [("Ops", "ops@example.com")]
    settings.REDIS_URL = ""
    # The operations alerts' deployment-down rule enabled too: its evaluator closed only the breaker's incidents.
    OpsAlertRule.objects.create(name="down", kind=OpsAlertKind.DEPLOYMENT_DOWN, threshold=0)
    provider = ProviderFactory(name="east", base_url=fake_upstream.base_url + "/v1")
    deployment = ModelFactory(name="gpt-4o-mini", provider=provider, upstream_id="fake-gpt-4o-mini").deployments.get()
    set_fault(provider, "503")

    with time_machine.travel(START, tick=False) as clock:
        for _ in range(2):
            providers_health_check_all.delay().get()
            clock.shift(timedelta(minutes=5))
        incident = Incident.objects.get()
        assert incident.ended_at is None and "overloaded" in incident.reason

        if taken_out == "provider":
            Provider.objects.filter(pk=provider.pk).update(enabled=False)
        elif taken_out == "deployment":
            Deployment.objects.filter(pk=deployment.pk).update(enabled=False)
        else:
            CatalogModel.objects.filter(pk=deployment.model_id).update(enabled=False)
        closed_at = START + timedelta(minutes=10)
        for _ in range(3):  # the next rounds and evaluations: one close, no reopening
            providers_health_check_all.delay().get()
            ops_alerts_evaluate()
            clock.shift(timedelta(minutes=5))

    incident = Incident.objects.get()
    assert (incident.ended_at, incident.ended_because) == (closed_at, because)
    down = "[llmhub] deployment east of model gpt-4o-mini is down"
    assert [message.subject for message in mail.outbox] == [
        down,
        down.replace("is down", "is no longer watched (not a recovery)"),
    ]
    down_hook, closed_hook = (hook["text"] for hook in webhook.received)
    assert "is down since" in down_hook and "back up" not in closed_hook
    assert f"its incident is closed, not recovered: {because}, after 5" in closed_hook
