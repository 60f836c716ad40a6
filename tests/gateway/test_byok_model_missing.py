"""A catalog entry whose upstream model id the provider does not serve (a typo, a retired model): once the health
round has found it missing from the provider's model list, a 404 for it is the catalog's mistake, whichever key
the request went out with. A user's own key is not blamed for it (no 401 ``user_key_refused``, no mark, no
email), and the failure counts against the deployment's breaker and moves on like any 404 on the platform's
key; while that breaker is open every user is told the model is unavailable at its provider, not a generic 503.

The fake upstream lists fixed model ids (``fake-gpt-typo`` is not one) and answers a request naming
``fake-gpt-typo`` with a 404 (a standing fault for that model only), as OpenAI answers an unknown model."""

from __future__ import annotations

import httpx
import openai
import pytest
from django.conf import settings
from django.core import mail

from audit.models import AuditEvent
from billing.models import UsageStatus
from billing.services.keys import api_key_create
from llmhub.testing.fake_upstream import key_digest
from providers.models import CredentialStatus, Deployment
from providers.routing.breaker_machine import HALF_OPEN, OPEN
from providers.routing.breakers import breaker_reset, breaker_state
from providers.services.health import health_check_round
from tests.factories import ProviderFactory, UserFactory
from tests.gateway.test_byok import PLATFORM_KEY, model_on
from tests.gateway.test_byok_refused import ENTRY_POINTS, ask, credential
from tests.gateway.test_byok_refused import setup as refused_setup  # noqa: F401  (a fixture)
from tests.providers.health_probes import breakers_closed_after  # noqa: F401  (a fixture)
from tests.waiting import wait_for_ledger_rows, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("breakers_closed_after")]

TYPO = "fake-gpt-typo"
OWN_KEY = "sk-alice-own-valid-canary-6c7d8e9f"
UNAVAILABLE = "is unavailable at its provider"


@pytest.fixture
def world(request):
    """``typo-model`` on the provider that takes own keys, mapped to an id its provider does not serve (its
    deployment: ``world["typo"]``); Alice has a valid key of her own there (``world["row"]``)."""
    setup = request.getfixturevalue("refused_setup")  # test_byok_refused's world: the providers, Alice, her secret
    upstream = setup["upstream"]
    httpx.post(upstream.base_url + "/__control", json={"accept_keys": [OWN_KEY]}, timeout=5).raise_for_status()
    upstream.set_fault("404", models=[TYPO])
    model_on("typo-model", setup["optional"], upstream_ids=[TYPO])
    setup["row"] = credential(setup["alice"], setup["optional"], key=OWN_KEY)
    setup["typo"] = Deployment.objects.get(model__name="typo-model")
    yield setup
    upstream.set_fault(None)


def found_missing(setup) -> None:
    """A health round: the provider's model list lacks the id, so the deployment is marked and its breaker opened."""
    health_check_round(providers=[setup["optional"]])
    deployment = setup["typo"]
    deployment.refresh_from_db()
    assert deployment.upstream_model_missing_since is not None
    assert breaker_state(deployment.pk).state == OPEN


def assert_unavailable(status: int | None, text: str, entry: str) -> None:
    assert status == (None if entry == "websocket" else 502), text
    # OpenAI's shape (and the socket's error event) carry the code; Anthropic's (/v1/messages) its type.
    assert ("api_error" if entry == "messages" else "upstream_model_not_found") in text
    assert UNAVAILABLE in text and repr(TYPO) in text
    assert "refused your own API key" not in text and "user_key_refused" not in text
    assert OWN_KEY not in text


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_404_on_an_own_key_for_a_model_found_missing_is_the_catalogs_not_the_users_key(world, entry):
    """Its breaker closed again (as it half-opens after its cooldown), the request goes out on Alice's own key
    and meets the 404: she is told the model is unavailable at its provider, not that her key was refused; her
    key stays valid (no mark, no audit, no email) and the ledger row is the provider failing, not hers."""
    found_missing(world)
    breaker_reset(world["typo"].pk)

    status, text = ask(world, entry, "typo-model")

    assert_unavailable(status, text, entry)
    assert world["upstream"].requests[-1]["key_sha256"] == key_digest(OWN_KEY)
    assert wait_for_ledger_rows(1, user=world["alice"], status=UsageStatus.UPSTREAM_ERROR) == 1
    world["row"].refresh_from_db()
    assert world["row"].status == CredentialStatus.VALID
    assert not AuditEvent.objects.filter(action="provider_key.validation_failed").exists()
    assert not mail.outbox


def test_404s_on_own_keys_for_a_model_found_missing_count_against_its_breaker(world):
    """Before, a 404 on a user's key never counted: a half-open breaker stayed half-open while every own-key
    request was blamed on its key. Now they count as the platform key's do, and the breaker opens."""
    found_missing(world)
    breaker_reset(world["typo"].pk)

    for _ in range(settings.LLMHUB_BREAKER_FAILURES):
        status, text = ask(world, "chat", "typo-model")
        assert status == 502 and UNAVAILABLE in text, text

    assert breaker_state(world["typo"].pk).state == OPEN


def test_a_model_with_another_deployment_is_served_there_on_the_platforms_key(world):
    """The missing one is the deployment's failure, not the key's: the request moves on to the next deployment,
    as a platform key's 404 does (before, it ended with Alice's key refused)."""
    platform = ProviderFactory(name="platform-openai", base_url=world["upstream"].base_url + "/v1")
    model_on("typo-mixed", world["optional"], platform, upstream_ids=[TYPO, "fake-gpt-4o-mini"])
    health_check_round(providers=[world["optional"]])
    missing = Deployment.objects.get(model__name="typo-mixed", provider=world["optional"])
    breaker_reset(missing.pk)

    status, text = ask(world, "chat", "typo-mixed")

    assert status == 200, text
    calls = [r for r in world["upstream"].requests if r["path"] == "/v1/chat/completions"]
    assert [r["key_sha256"] for r in calls[-2:]] == [key_digest(OWN_KEY), key_digest(PLATFORM_KEY)]


def test_a_platform_key_user_meeting_the_404_is_told_the_same(world):
    found_missing(world)
    breaker_reset(world["typo"].pk)
    bob = UserFactory(username="bob")
    client = openai.OpenAI(
        base_url=world["server"].url + "/v1", api_key=api_key_create(user=bob, name="bob").secret, max_retries=0
    )

    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="typo-model", messages=[{"role": "user", "content": "hi"}])

    assert raised.value.status_code == 502 and raised.value.code == "upstream_model_not_found"
    assert UNAVAILABLE in raised.value.message and repr(TYPO) in raised.value.message
    assert world["upstream"].requests[-1]["key_sha256"] == key_digest(PLATFORM_KEY)


@pytest.mark.parametrize("entry", ["chat", "messages", "websocket"])
def test_while_its_breaker_is_open_every_user_is_told_the_model_is_missing_not_a_generic_503(world, entry):
    """The health round opened the breaker: nothing is sent, and both Alice (her own key) and Bob (the platform's)
    are told the model is unavailable at its provider, not 503 no_deployment_available ("retry shortly")."""
    found_missing(world)
    sent = len(world["upstream"].requests)

    status, text = ask(world, entry, "typo-model")  # Alice, on her own key

    assert_unavailable(status, text, entry)
    bob = UserFactory(username="bob")  # no key of his own: the platform's
    client = openai.OpenAI(
        base_url=world["server"].url + "/v1", api_key=api_key_create(user=bob, name="bob").secret, max_retries=0
    )
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="typo-model", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 502 and raised.value.code == "upstream_model_not_found"
    assert UNAVAILABLE in raised.value.message
    assert len(world["upstream"].requests) == sent  # nothing was sent: the breaker left it out


def test_a_half_open_breakers_probe_on_an_own_key_opens_it_again(world, settings):
    """The case reported: the round opened the breaker; once half-open, the probe went out on Alice's key, was
    blamed on her key and given back, so the breaker stayed half-open. Now the probe's 404 opens it again."""
    settings.LLMHUB_BREAKER_COOLDOWN_SECONDS = 1
    found_missing(world)
    wait_until(lambda: breaker_state(world["typo"].pk).state == HALF_OPEN, "the breaker half-opens", timeout=10)

    status, text = ask(world, "chat", "typo-model")

    assert status == 502 and UNAVAILABLE in text, text
    assert world["upstream"].requests[-1]["key_sha256"] == key_digest(OWN_KEY)  # the probe went out on her key
    assert breaker_state(world["typo"].pk).state == OPEN
