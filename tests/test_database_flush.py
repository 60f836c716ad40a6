"""The flush that ends a transactional test (tests/conftest.py, ``_flush_retrying_deadlocks``): every table emptied,
content types and permissions kept as migrations made them, on SQLite and on PostgreSQL (where only the tables that
hold rows are emptied, ``_empty_the_filled``)."""

from __future__ import annotations

import threading

import pytest
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection, connections
from django.test import TransactionTestCase

from tests.conftest import KEPT_BY_THE_FLUSH
from tests.factories import DeploymentFactory, UsageRecordFactory, UserFactory


class _Flushed(TransactionTestCase):
    databases = {"default"}


def _rows() -> dict[str, int]:
    counts = {}
    with connection.cursor() as cursor:
        for table in connection.introspection.django_table_names(only_existing=True, include_views=False):
            cursor.execute(f"SELECT COUNT(*) FROM {connection.ops.quote_name(table)}")
            counts[table] = cursor.fetchone()[0]
    return counts


def _written_by_another_connection() -> None:
    """A row committed by another connection (a live server's thread) before the flush."""

    def write() -> None:
        try:
            Group.objects.create(name="written-elsewhere")
        finally:
            connections.close_all()

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()


@pytest.mark.django_db(transaction=True)
def test_the_flush_empties_every_table_a_test_filled_and_keeps_content_types_and_permissions() -> None:
    kept = {
        "content types": sorted(ContentType.objects.values_list("id", "app_label", "model")),
        "permissions": sorted(Permission.objects.values_list("id", "codename", "content_type_id")),
    }
    assert kept["content types"] and kept["permissions"]
    user = UserFactory()
    UsageRecordFactory(user=user)
    DeploymentFactory()
    user.groups.add(Group.objects.create(name="a group"))  # a row referring to two others
    _written_by_another_connection()
    filled = {table for table, count in _rows().items() if count and table not in KEPT_BY_THE_FLUSH}
    assert {"auth_user", "auth_group", "auth_user_groups", "billing_usagerecord"} <= filled

    _Flushed("run")._fixture_teardown()

    assert {table: count for table, count in _rows().items() if count and table not in KEPT_BY_THE_FLUSH} == {}
    assert {
        "content types": sorted(ContentType.objects.values_list("id", "app_label", "model")),
        "permissions": sorted(Permission.objects.values_list("id", "codename", "content_type_id")),
    } == kept
