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
from tests.factories import ModelFactory

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
