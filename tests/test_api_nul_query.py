"""A NUL byte (``%00``) in an /api/ address's query is a 400 in the API's error shape, never a server error.

PostgreSQL's text cannot hold U+0000: a filter's value that reached a query as it came was the database's
``DataError``, a 500, as the admin's lists were until ``core.admin_query``. Every /api/ filter is read through a
serializer: DRF's ``CharField`` (and the ``RegexField`` derived from it) refuses a NUL ("Null characters are not
allowed."), a choice, a date or a number that holds one is not valid, and the rest of the query (``limit``,
``offset``, ``format``) is read as a number or compared in Python. The test walks every GET operation the OpenAPI
document lists under /api/, with rows for its filters to search and an existing object in its path, and sends
each documented query parameter with a NUL in its value, and a NUL in a parameter's name. This module runs on
PostgreSQL too (the Makefile's ``POSTGRES_TESTS``), where a filter that reached the database unchecked fails it."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.db import connection
from rest_framework.test import APIClient

from billing.services.keys import api_key_create
from chat.models import Conversation
from experiments.models import Experiment
from tests.factories import ModelFactory, UsageRecordFactory

pytestmark = pytest.mark.django_db

NUL = "a\x00b"
# Parameters some views read beside their documented filters; what a client may send anywhere.
UNDOCUMENTED = ("limit", "offset", "format")


def _get_operations(schema: dict[str, Any]) -> list[tuple[str, list[str]]]:
    return [
        (path, [p["name"] for p in item["get"].get("parameters", []) if p["in"] == "query"])
        for path, item in schema["paths"].items()
        if path.startswith("/api/") and "get" in item
    ]


def _body(response: Any) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def test_every_api_filter_refuses_a_nul_with_a_400(admin_user):
    client = APIClient()
    client.force_login(admin_user)
    schema = client.get("/api/schema/", {"format": "json"}).json()
    model = ModelFactory()
    UsageRecordFactory(user=admin_user, model_name=model.name)
    ids = {
        "key_id": api_key_create(user=admin_user).api_key.pk,
        "experiment_id": Experiment.objects.create(name="nul-scan", model=model).pk,
        "id": Conversation.objects.create(owner=admin_user, model_name=model.name).pk,
    }
    # The cost estimate refuses a request without a model before it reads its other parameters.
    required = {"/api/cost/estimate": {"model": model.name}}
    operations = _get_operations(schema)
    assert {"/api/usage/", "/api/audit/", "/api/experiments/", "/api/cost/estimate"} <= {path for path, _ in operations}

    answers: list[tuple[str, str, int, bytes]] = []
    for path, documented in operations:
        url = re.sub(r"\{([^}]*)\}", lambda found: str(ids.get(found.group(1), 1)), path)
        base = required.get(path, {})
        for name in [*documented, *UNDOCUMENTED]:
            response = client.get(url, {**base, name: NUL})
            answers.append((path, name, response.status_code, _body(response)))
        response = client.get(url, {**base, "a\x00": "b"})
        answers.append((path, "a\\x00", response.status_code, _body(response)))

    assert not [answer for answer in answers if answer[2] >= 500], connection.vendor
    refused = {(path, name): json.loads(body)["error"] for path, name, status, body in answers if status == 400}
    for where, error in refused.items():
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", where
    # The filters that search text answered so, naming themselves, not because something else was missing.
    for path, name in [
        ("/api/usage/", "model"),
        ("/api/usage/", "key"),
        ("/api/usage/summary/", "user"),
        ("/api/audit/", "actor"),
        ("/api/audit/export.csv", "target_id"),
        ("/api/experiments/", "model"),
        ("/api/cost/estimate", "model"),
    ]:
        assert refused[(path, name)]["param"] == name, (path, name)
