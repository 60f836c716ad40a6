"""What Django refuses before any view runs answers in the API's error shape under /api/ and /v1/."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("path", ["/api/cost/estimate", "/api/keys/"])
def test_too_many_form_fields_is_a_json_400_on_the_api(path):
    body = "&".join(f"f{n}=x" for n in range(1_200))  # over DATA_UPLOAD_MAX_NUMBER_FIELDS (1,000)
    client = Client()
    client.force_login(UserFactory())

    response = client.post(path, data=body, content_type="application/x-www-form-urlencoded")

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "bad_request"


def test_pages_keep_djangos_own_400():
    body = "&".join(f"f{n}=x" for n in range(1_200))

    response = Client().post("/accounts/login/", data=body, content_type="application/x-www-form-urlencoded")

    assert response.status_code in (400, 403)  # 403: the CSRF check may refuse it first
    assert response["Content-Type"].startswith("text/html")
