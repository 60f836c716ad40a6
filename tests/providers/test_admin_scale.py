"""The providers' admin pages cost the same queries however many rows they show (docs/performance.md, "The
admin at scale")."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from providers.models import ModerationPolicy
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory

pytestmark = pytest.mark.django_db


def page_queries(client: Client, url: str) -> tuple[int, str]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200
    return len(captured), response.content.decode()


def test_the_moderation_policies_list_counts_each_policys_models_without_a_query_a_row(admin_client):
    url = reverse("admin:providers_moderationpolicy_changelist")
    first = ModerationPolicy.objects.create(name="policy-0")
    ModelFactory(moderation_policy=first)
    page_queries(admin_client, url)  # the first view fills Django's caches (content types): not counted
    few, _ = page_queries(admin_client, url)

    for n in range(1, 11):
        policy = ModerationPolicy.objects.create(name=f"policy-{n}")
        for _ in range(n % 3):
            ModelFactory(moderation_policy=policy)
    many, page = page_queries(admin_client, url)

    assert many == few
    shown = re.findall(r'field-name"><a [^>]*>([^<]+)</a></th>.*?<td class="field-models_using">(\d+)</td>', page)
    counts = {name: int(count) for name, count in shown}
    assert counts == {"policy-0": 1, **{f"policy-{n}": n % 3 for n in range(1, 11)}}


def test_a_models_change_page_costs_the_same_queries_however_many_deployments_it_has(admin_client):
    """Each deployment's row names itself after its model and offers every provider: read once for the page."""
    model = ModelFactory(name="busy")
    url = reverse("admin:providers_catalogmodel_change", args=[model.pk])
    page_queries(admin_client, url)  # the first view fills Django's caches (content types): not counted
    few, _ = page_queries(admin_client, url)

    providers = [ProviderFactory(name=f"east-{n}") for n in range(8)]
    for provider in providers:
        DeploymentFactory(model=model, provider=provider, name=f"on-{provider.name}")
    many, page = page_queries(admin_client, url)

    assert many == few
    # Offered in every row: unselected in the 8 others and the blank row "Add another" copies, chosen in its own.
    assert page.count(f'<option value="{providers[-1].pk}">east-7</option>') == 9
    assert page.count(f'<option value="{providers[-1].pk}" selected>east-7</option>') == 1
