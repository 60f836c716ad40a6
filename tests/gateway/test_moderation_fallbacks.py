"""A fallback's own input policy, through the openai SDK against a live llmhub and the fake upstream: the model
``primary`` (no policy, its one deployment failing with the fake's ``fault-503``, no retries) falls back to
models whose admins set input policies. Each policy reads the input before its model is tried."""

from __future__ import annotations

import httpx
import openai
import pytest

from billing.models import UsageRecord
from providers.models import ModerationAction, ModerationChecker, ModerationPolicy, Provider
from providers.moderation import policy_cache
from tests.factories import ModelFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
MODERATIONS = "/v1/moderations"


@pytest.fixture(autouse=True)
def _fresh_policies():
    policy_cache.invalidate()
    yield
    policy_cache.invalidate()


def model(name: str, upstream: str = "fake-gpt-4o-mini", *, policy: ModerationPolicy | None = None, **fields):
    provider = Provider.objects.get(name="fake-openai")
    fields.setdefault("retries", 0)
    return ModelFactory(name=name, provider=provider, upstream_id=upstream, moderation_policy=policy, **fields)


def blocklist(name: str, words: str = "forbidden") -> ModerationPolicy:
    return ModerationPolicy.objects.create(name=name, blocklist=words)


def service(name: str) -> ModerationPolicy:
    """A policy asking the fake's moderation service about the input, blocking what it flags (``[flag:violence]``)."""
    return ModerationPolicy.objects.create(
        name=name,
        check_output=False,
        checker=ModerationChecker.OPENAI,
        action=ModerationAction.BLOCK,
        moderation_provider=Provider.objects.get(name="fake-openai"),
        moderation_model="omni-moderation-latest",
    )


def asked(upstream, upstream_id: str) -> int:
    return sum(1 for entry in upstream.requests if entry["body"].get("model") == upstream_id)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_fallback_never_gets_an_input_its_own_policy_blocks(gateway, stream):
    """``primary`` has no policy; its fallback ``guarded`` blocks "forbidden". The fallback was sent the input
    unchecked and answered it; now its policy reads it first and skips it, and the client gets the primary's own
    failure, with one ledger row saying why the fallback was not tried."""
    model("guarded", "fake-o3-mini", policy=blocklist("guard"))
    model("primary", "fault-503", fallbacks=["guarded"])

    with pytest.raises(openai.APIStatusError) as failed:
        response = gateway.client().chat.completions.create(
            model="primary", messages=[{"role": "user", "content": "say the forbidden word"}], stream=stream
        )
        if stream:
            list(response)

    assert failed.value.status_code == 503
    assert asked(gateway.upstream, "fake-o3-mini") == 0
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert UsageRecord.objects.count() == 1
    assert record.status == "upstream_error" and record.attempts == 1 and record.cost == 0
    assert record.moderation.startswith('fallback "guarded" skipped: blocked input: blocklist (entry 1')
    assert 'policy "guard"' in record.moderation


def test_the_next_fallback_answers_when_one_is_refused(gateway):
    model("guarded", "fake-o3-mini", policy=blocklist("guard"))
    model("open", "fake-gpt-4o-mini")
    model("primary", "fault-503", fallbacks=["guarded", "open"])

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "say the forbidden word"}]
    )

    assert raw.parse().choices[0].message.content
    assert raw.headers["x-llmhub-attempts"] == "2"
    assert asked(gateway.upstream, "fake-o3-mini") == 0
    record = wait_for_record(raw.headers["x-request-id"])
    assert UsageRecord.objects.count() == 1
    assert record.status == "ok" and record.model_name == "open" and record.requested_model == "primary"
    assert record.moderation.startswith('fallback "guarded" skipped: blocked input')


def test_a_fallback_whose_policy_passes_the_input_answers(gateway):
    model("guarded", "fake-o3-mini", policy=blocklist("guard"))
    model("primary", "fault-503", fallbacks=["guarded"])

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "a harmless question"}]
    )

    assert raw.parse().choices[0].message.content
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.status == "ok" and record.model_name == "guarded" and record.moderation == ""


def test_a_policy_reads_the_input_once_for_every_fallback_under_it(gateway):
    """Two fallbacks under the same service policy: one question to the service, the verdict reused; the third
    fallback has none and answers."""
    policy = service("svc")
    model("first", "fake-o3-mini", policy=policy)
    model("second", "fake-o3-mini", policy=policy)
    model("open", "fake-gpt-4o-mini")
    model("primary", "fault-503", fallbacks=["first", "second", "open"])

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "hit him [flag:violence]"}]
    )

    assert raw.parse().choices[0].message.content
    assert gateway.upstream.requests_served(MODERATIONS) == 1
    assert asked(gateway.upstream, "fake-o3-mini") == 0
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.model_name == "open" and record.attempts == 2
    assert 'fallback "first" skipped: blocked input' in record.moderation
    assert 'fallback "second" skipped: refused by the same policy' in record.moderation


def test_a_fallback_under_the_policy_already_applied_is_not_asked_again(gateway):
    policy = service("svc")
    model("guarded", "fake-gpt-4o-mini", policy=policy)
    model("primary", "fault-503", policy=policy, fallbacks=["guarded"])

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "a harmless question"}]
    )

    assert raw.parse().choices[0].message.content
    assert gateway.upstream.requests_served(MODERATIONS) == 1


def test_no_moderation_call_when_no_candidate_has_a_policy(gateway):
    model("open", "fake-gpt-4o-mini")
    model("primary", "fault-503", fallbacks=["open"])

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "hit him [flag:violence]"}]
    )

    assert raw.parse().choices[0].message.content
    assert gateway.upstream.requests_served(MODERATIONS) == 0
    assert wait_for_record(raw.headers["x-request-id"]).moderation == ""


def test_a_fallbacks_failing_service_that_fails_closed_skips_it(gateway):
    model("guarded", "fake-o3-mini", policy=service("svc"))
    model("open", "fake-gpt-4o-mini")
    model("primary", "fault-503", fallbacks=["guarded", "open"])
    gateway.upstream.set_fault("503", models=["omni-moderation-latest"])

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "a harmless question"}]
    )

    assert record_of(raw).model_name == "open"
    assert asked(gateway.upstream, "fake-o3-mini") == 0
    assert 'fallback "guarded" skipped: input unchecked: moderation unavailable' in record_of(raw).moderation


def record_of(raw) -> UsageRecord:
    return wait_for_record(raw.headers["x-request-id"])


def test_when_every_context_window_fallback_is_refused_the_client_gets_the_first_refusal(gateway):
    """Too long for ``short``: its context-window fallbacks are the whole plan, and each one's policy refuses the
    input. The client gets the first one's refusal, as asking that model would have answered, and nothing went to
    either."""
    model("long", "fake-o3-mini", policy=blocklist("guard-long"))
    model("longer", "fake-o3-mini", policy=blocklist("guard-longer"))
    model("short", "fault-context", context_window_fallbacks=["long", "longer"])

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="short", messages=[{"role": "user", "content": "say the forbidden word"}]
        )

    assert refused.value.code == "content_policy_violation"
    assert 'policy "guard-long"' in refused.value.message
    assert asked(gateway.upstream, "fake-o3-mini") == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert UsageRecord.objects.count() == 1
    assert record.status == "invalid" and record.error_type == "content_policy_violation" and record.cost == 0


@pytest.mark.parametrize("plan", ["fallbacks", "context_window_fallbacks"])
def test_a_prompt_of_token_ids_never_reaches_a_fallback_whose_policy_reads_text(gateway, plan):
    """A policy reads text: token ids would pass it unread. The model asked for has no policy and fails; its
    fallback's policy cannot read the prompt, so the fallback is skipped. After a failed attempt the client gets
    that failure; when the fallbacks are the whole plan (too long for the model), the 400 that asking the first
    of them would have given."""
    model("guarded", "fake-o3-mini", policy=blocklist("guard"))
    model("primary", "fault-503" if plan == "fallbacks" else "fault-context", **{plan: ["guarded"]})

    response = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": "primary", "prompt": [1, 2, 3]},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    )

    assert asked(gateway.upstream, "fake-o3-mini") == 0
    record = wait_for_record(response.headers["x-request-id"])
    assert UsageRecord.objects.count() == 1
    assert record.moderation == 'fallback "guarded" skipped: input unread: unsupported_value'
    if plan == "fallbacks":
        assert response.status_code == 503, response.text
        assert record.status == "upstream_error"
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "prompt"
        assert record.status == "invalid" and record.error_type == "unsupported_value" and record.cost == 0
