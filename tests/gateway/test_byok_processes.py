"""A user's own provider key deleted through one llmhub server process is not used by another for the next
request: each server (uvicorn, its own key cache and client pool, on the test database) hears of the delete
through Redis (``core.broadcast``) instead of serving the deleted key until its cached copy runs out
(``LLMHUB_LOOKUP_CACHE_TTL``, 5 s)."""

from __future__ import annotations

import httpx
import openai
import pytest
import redis

from billing.services.keys import api_key_create
from core.broadcast import CHANNEL
from llmhub.testing.fake_upstream import UpstreamSpec, key_digest
from providers.models import ByokMode
from tests.billing.test_concurrency import ServerProcess
from tests.conftest import wait_for_port
from tests.factories import ProviderFactory, UserFactory
from tests.gateway.test_byok import ALICE_KEY, MESSAGES, PLATFORM_KEY, model_on, own_key
from tests.shared_redis import use_redis  # noqa: F401  (a fixture)
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("use_redis")]


@pytest.fixture
def servers(redis_url, tmp_path):
    started = [ServerProcess(redis_url, tmp_path / f"server-{n}.log", None) for n in range(2)]
    try:
        for server in started:
            wait_for_port(server.port, process=server.process)
        yield [server.url for server in started]
    finally:
        for server in started:
            server.stop()


def test_a_key_deleted_through_one_server_is_not_used_by_another_for_the_next_request(
    redis_url, servers, fake_upstreams
):
    upstream = fake_upstreams(UpstreamSpec(name="byok", api_key=PLATFORM_KEY))["byok"]
    httpx.post(upstream.base_url + "/__control", json={"accept_keys": [ALICE_KEY]}, timeout=5).raise_for_status()
    provider = ProviderFactory(name="optional-openai", base_url=upstream.base_url + "/v1", byok=ByokMode.OPTIONAL)
    model_on("opt-model", provider)
    alice = UserFactory(username="alice")
    credential = own_key(alice, provider)
    secret = api_key_create(user=alice, name="alice", scopes=["keys:manage"]).secret
    first, second = servers

    def chat_on(url: str) -> str:
        """The digest of the provider key a chat request through ``url`` reached the upstream with."""
        client = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0, timeout=30)
        client.chat.completions.create(model="opt-model", messages=MESSAGES)
        return [r["key_sha256"] for r in upstream.requests if r["path"].endswith("/chat/completions")][-1]

    assert chat_on(second) == key_digest(ALICE_KEY)  # the second server holds her key now, cached and pooled
    with redis.Redis.from_url(redis_url) as client:
        wait_until(lambda: client.pubsub_numsub(CHANNEL)[0][1] >= 1, "the second server listening", timeout=10)

    deleted = httpx.delete(
        f"{first}/api/provider-keys/{credential.pk}/", headers={"Authorization": f"Bearer {secret}"}, timeout=30
    )
    assert deleted.status_code == 204, deleted.text

    assert chat_on(second) == key_digest(PLATFORM_KEY)
