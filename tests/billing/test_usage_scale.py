"""The usage pages at scale: the staff page of everyone's usage answers, in the same queries, however many users
spent in its 30 days (docs/ledger.md, "The admin at scale")."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from billing.models import DailyUserUsage
from core.id_batches import id_batches
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
User = get_user_model()


def spenders(count: int, *, start: int) -> None:
    """``count`` users, each with a day of spend in the per-user rollup five days ago (user ``n`` spent ``n`` cents)."""
    users = User.objects.bulk_create(User(username=f"s{n}") for n in range(start, start + count))
    DailyUserUsage.objects.bulk_create(
        DailyUserUsage(
            day=(NOW - timedelta(days=5)).date(),
            user=user,
            requests=1,
            prompt_tokens=10,
            completion_tokens=5,
            cost=Decimal(int(user.username[1:])) / 100,
        )
        for user in users
    )


def users_chart(html: str) -> dict:
    return json.loads(re.search(r'<script id="chart-users-data" type="application/json">(.*?)</script>', html, re.S)[1])


@pytest.mark.usefixtures("sqlite_variable_limit")
def test_the_staff_usage_page_names_its_users_however_many_spent():
    """More users spent in the 30 days than a statement can name: the page named them all in one ``IN`` (a 500,
    "too many SQL variables"); it answers, its top spenders named, with one more query a batch of users named."""
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True))
    with time_machine.travel(NOW, tick=False):
        spenders(3, start=1)
        client.get("/usage/admin/")  # the first view fills Django's caches (content types): not counted
        with CaptureQueriesContext(connection) as few:
            assert client.get("/usage/admin/").status_code == 200

        spenders(1_500, start=4)
        with CaptureQueriesContext(connection) as many:
            page = client.get("/usage/admin/")

    assert page.status_code == 200
    html = page.content.decode()
    assert users_chart(html)["labels"][:3] == ["s1503", "s1502", "s1501"]
    assert len(many) == len(few) + len(list(id_batches(range(1_503)))) - 1
