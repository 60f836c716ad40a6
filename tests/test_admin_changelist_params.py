"""Every list of the admin, asked as a superuser with an address it cannot read, answers without a server error:
a bogus or out-of-range ordering (``?o=``), page (``?p=``), error flag (``?e=``), a 10 KB search (``?q=``, a number
past any integer column, bytes that are no UTF-8), an odd ``_changelist_filters``, and on a list with a date
hierarchy a year, month or day that is no date or past Python's last one. Until 7 December the year 9999 (its end is
the year 10000), its December or its last day, and a year of 20 digits were a server error on every list with a date
hierarchy (incidents, ops alert incidents, scheduled tasks): they are now the admin's answer to a filter it cannot
read, a redirect to ``?e=1`` (``core.admin_dates``). The add page takes an odd ``_changelist_filters`` too. Runs on
PostgreSQL too (``POSTGRES_TESTS``), whose integer columns and text refuse what SQLite stores."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.urls import reverse

from billing.services.keys import api_key_create
from tests.factories import ModelFactory, UsageRecordFactory

pytestmark = pytest.mark.django_db

REGISTERED = sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)

ODD: list[dict[str, str]] = [
    {"o": "bogus"},
    {"o": "999"},
    {"o": "-1.x.-2"},
    {"o": "1." * 2000},
    {"p": "bogus"},
    {"p": "999999"},
    {"p": "-1"},
    {"p": "9" * 30},
    {"e": "1"},
    {"e": "bogus"},
    {"q": "x" * 10240},
    {"q": "9" * 20},
    {"q": "-" + "9" * 20},
    {"q": "'\"%_\\"},
    {"_changelist_filters": "o=bogus&p=x&q=" + "y" * 5000},
    {"_changelist_filters": "%%%&&=="},
    {"all": "1", "_facets": "x"},
]


def dates_past_python(field: str) -> list[dict[str, str]]:
    """Date hierarchy addresses whose bounds Python's datetime cannot hold (the year 10000 and past)."""
    return [
        {f"{field}__year": "9999"},
        {f"{field}__year": "9999", f"{field}__month": "12"},
        {f"{field}__year": "9999", f"{field}__month": "12", f"{field}__day": "31"},
        {f"{field}__year": "9" * 20},
    ]


def not_dates(field: str) -> list[dict[str, str]]:
    return [
        {f"{field}__year": "abcd"},
        {f"{field}__year": "0"},
        {f"{field}__year": "-1"},
        {f"{field}__year": "2026", f"{field}__month": "13"},
        {f"{field}__year": "2026", f"{field}__month": "2", f"{field}__day": "30"},
        {f"{field}__month": "9" * 20},
        {f"{field}__day": "x"},
    ]


def _shown(params: dict[str, str]) -> dict[str, str]:
    return {name: value[:30] for name, value in params.items()}


@pytest.fixture
def rows(admin_user) -> None:
    ModelFactory()
    UsageRecordFactory(user=admin_user)
    api_key_create(user=admin_user, name="listed")


@pytest.mark.parametrize(("model", "model_admin"), REGISTERED, ids=[model._meta.label for model, _ in REGISTERED])
def test_a_list_asked_with_an_address_it_cannot_read_answers_without_a_server_error(
    admin_client, rows, model: Any, model_admin: admin.ModelAdmin
):
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    field = model_admin.date_hierarchy
    failed = []
    for params in [*ODD, *(not_dates(field) + dates_past_python(field) if field else [])]:
        response = admin_client.get(url, params)
        if response.status_code >= 500:
            failed.append((_shown(params), response.status_code))
    # Bytes that are no UTF-8 (a lone surrogate's), as a browser would send them.
    assert admin_client.get(url + "?q=%ED%A0%80").status_code < 500
    assert not failed, failed
    if model_admin.has_add_permission(admin_client.get(url).wsgi_request):
        add = reverse(f"admin:{opts.app_label}_{opts.model_name}_add")
        assert admin_client.get(add, {"_changelist_filters": "%%%&o=bogus&p=-1"}).status_code == 200


DATED = [(model, model_admin) for model, model_admin in REGISTERED if model_admin.date_hierarchy]


@pytest.mark.parametrize(("model", "model_admin"), DATED, ids=[model._meta.label for model, _ in DATED])
def test_a_date_hierarchy_year_past_python_is_the_lists_bad_address_and_a_real_one_still_lists(
    admin_client, model: Any, model_admin: admin.ModelAdmin
):
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    field = model_admin.date_hierarchy

    for params in dates_past_python(field):
        response = admin_client.get(url, params)
        assert (response.status_code, response.get("Location")) == (302, f"{url}?e=1"), _shown(params)
    assert (
        admin_client.get(url, {f"{field}__year": "9998", f"{field}__month": "12", f"{field}__day": "31"}).status_code
        == 200
    )
    assert admin_client.get(url, {f"{field}__year": "2026", f"{field}__month": "12"}).status_code == 200


def test_every_list_with_a_date_hierarchy_is_walked():
    assert {model._meta.label for model, _ in DATED} >= {
        "providers.Incident",
        "billing.OpsAlertIncident",
        "django_celery_beat.PeriodicTask",
    }
