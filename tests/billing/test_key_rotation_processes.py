"""A rotated gateway key across two llmhub server processes (uvicorn, each with its own key cache, on the
test database): the old secret works in both during the grace period and gets 401 in both after it.

The grace period (15 s) is longer than the lookup cache's TTL, so each server's copy cached before the
rotation (which knows nothing of it) runs out inside the grace, and the old secret is then looked up afresh
and still accepted; from the end of the grace, every copy in every process refuses it. Nothing here asserts
that something happens within a time: requests that come back after the grace ended are not held to the
grace's answer, and after it the test waits for the clock, not for a server."""

from __future__ import annotations

import time

import httpx
import pytest
from django.conf import settings
from django.utils import timezone

from billing.services.keys import api_key_create, api_key_rotate
from tests.billing.test_concurrency import ServerProcess
from tests.conftest import wait_for_port
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

GRACE_SECONDS = 15


@pytest.fixture
def servers(tmp_path):
    started = [ServerProcess(None, tmp_path / f"server-{n}.log", None) for n in range(2)]
    try:
        for server in started:
            wait_for_port(server.port, process=server.process)
        yield [server.url for server in started]
    finally:
        for server in started:
            server.stop()


def ask(url: str, secret: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def assert_accepted_while_in_grace(urls: list[str], secret: str, grace_ends) -> None:
    """Every answer that came back before the grace ended is a 200 (on a machine slow enough to come back
    later, the answer is not held to it)."""
    for url in urls:
        response = ask(url, secret)
        if timezone.now() < grace_ends:
            assert response.status_code == 200, (url, response.text)


def test_old_secret_works_on_both_servers_during_the_grace_then_gets_401_on_both(servers):
    assert GRACE_SECONDS > settings.LLMHUB_LOOKUP_CACHE_TTL + 2
    created = api_key_create(user=UserFactory(username="rotator"), name="shared")
    assert [ask(url, created.secret).status_code for url in servers] == [200, 200]  # cached as the current secret

    rotated = api_key_rotate(api_key=created.api_key, grace_seconds=GRACE_SECONDS)
    grace_ends = rotated.api_key.previous_secret_expires_at

    assert [ask(url, rotated.secret).status_code for url in servers] == [200, 200]
    assert_accepted_while_in_grace(servers, created.secret, grace_ends)
    # Past the TTL, each server has dropped its copy from before the rotation: the old secret is now looked up
    # as the previous secret of the key, and accepted for what is left of the grace.
    time.sleep(settings.LLMHUB_LOOKUP_CACHE_TTL + 0.5)
    assert_accepted_while_in_grace(servers, created.secret, grace_ends)

    time.sleep(max(0.0, (grace_ends - timezone.now()).total_seconds()) + 0.1)
    assert timezone.now() >= grace_ends
    refused = [ask(url, created.secret) for url in servers]
    assert [response.status_code for response in refused] == [401, 401]
    for response in refused:
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and "rotated" in error["message"]
        assert created.secret not in response.text
    assert [ask(url, rotated.secret).status_code for url in servers] == [200, 200]
