"""A fallback whose provider cannot take what the request asks, which the model asked for takes (``logprobs``, audio
output: refused by its adapter before any call, ``providers.adapters.common``; or by its provider's own 400), through
the openai SDK against a live llmhub and the fake upstream. The model ``primary`` (OpenAI's protocol, its one
deployment failing with the fake's ``fault-503``, no retries) falls back to another model."""

from __future__ import annotations

import openai
import pytest

from billing.models import UsageRecord
from providers.models import CatalogModel, Deployment, Provider
from tests.factories import DeploymentFactory, ModelFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

ASKS = {
    "logprobs": {"logprobs": True},
    "audio": {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
}
HELLO = [{"role": "user", "content": "hello"}]


def model(name: str, provider: str, upstream: str, **fields):
    fields.setdefault("retries", 0)
    return ModelFactory(name=name, provider=Provider.objects.get(name=provider), upstream_id=upstream, **fields)


def assert_the_models_own_503(error: openai.APIStatusError) -> None:
    """The client got the requested model's own failure (its 503, which a retry may get past), with one ledger row,
    of that model, costing nothing."""
    assert error.status_code == 503
    record = wait_for_record(error.response.headers["x-request-id"])
    assert UsageRecord.objects.count() == 1
    assert record.status == "upstream_error" and record.error_type == "upstream_unavailable"
    assert record.model_name == "primary" and record.cost == 0


@pytest.mark.parametrize("ask", ASKS.values(), ids=ASKS.keys())
def test_a_fallback_that_cannot_take_the_request_is_skipped_and_the_client_gets_the_models_own_failure(gateway, ask):
    """The client got the fallback's 400 ("This model does not return log probabilities") about a model it did not
    ask for, on a request the model it asked for takes: an invalid row, and an SDK that never retries it. The
    fallback is skipped; the client gets the model's own 503, which a retry may get past."""
    model("backup", "fake-anthropic", "fake-claude-haiku")
    model("primary", "fake-openai", "fault-503", fallbacks=["backup"])

    with pytest.raises(openai.APIStatusError) as failed:
        gateway.client().chat.completions.create(model="primary", messages=HELLO, **ask)

    assert_the_models_own_503(failed.value)


@pytest.mark.parametrize("ask", ASKS.values(), ids=ASKS.keys())
def test_the_next_fallback_answers_when_one_cannot_take_the_request(gateway, ask):
    model("backup", "fake-anthropic", "fake-claude-haiku")
    model("open", "fake-openai", "fake-gpt-4o-mini")
    model("primary", "fake-openai", "fault-503", fallbacks=["backup", "open"])

    raw = gateway.client().chat.completions.with_raw_response.create(model="primary", messages=HELLO, **ask)

    assert raw.parse().choices[0].message.content
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.status == "ok" and record.model_name == "open"
    assert not [entry for entry in gateway.upstream.requests if entry["body"].get("model") == "fake-claude-haiku"]


def test_the_model_asked_for_still_refuses_what_its_provider_cannot_take(gateway):
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="claude-test", messages=HELLO, logprobs=True)

    assert refused.value.code == "unsupported_parameter" and refused.value.param == "logprobs"


def test_a_fallback_with_a_smaller_context_window_is_skipped_and_the_client_gets_the_models_own_failure(gateway):
    """The prompt fits the model asked for, which fails; its fallback's window is smaller (the fake's
    ``fault-context``). The client got "This model's maximum context length is ..." about a model it did not ask
    for, a 400 with an invalid row; the fallback is skipped as one that cannot take the request."""
    model("small", "fake-openai", "fault-context")
    model("primary", "fake-openai", "fault-503", fallbacks=["small"])

    with pytest.raises(openai.APIStatusError) as failed:
        gateway.client().chat.completions.create(model="primary", messages=HELLO)

    assert failed.value.status_code == 503
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert record.status == "upstream_error" and record.model_name == "primary"


def test_the_next_fallback_answers_when_one_has_too_small_a_window(gateway):
    model("small", "fake-openai", "fault-context")
    model("open", "fake-openai", "fake-gpt-4o-mini")
    model("primary", "fake-openai", "fault-503", fallbacks=["small", "open"])

    raw = gateway.client().chat.completions.with_raw_response.create(model="primary", messages=HELLO)

    assert raw.parse().choices[0].message.content
    assert wait_for_record(raw.headers["x-request-id"]).model_name == "open"


def test_a_prompt_too_long_for_the_model_asked_for_still_moves_to_its_context_window_fallbacks(gateway):
    model("long", "fake-openai", "fake-gpt-4o-mini")
    model("short", "fake-openai", "fault-context", context_window_fallbacks=["long"])

    raw = gateway.client().chat.completions.with_raw_response.create(model="short", messages=HELLO)

    assert wait_for_record(raw.headers["x-request-id"]).model_name == "long"


# What a fallback's own provider refuses with its 400, where the model asked for takes the request: a parameter value
# past what its model writes (OpenAI's ``max_tokens is too large`` for gpt-4o-mini's 16384), and any 400 of its (the
# fake's ``fault-400``: Azure's ``reasoning_effort`` to a model that cannot reason, Mistral's 422 for a field it lacks).
PROVIDER_REFUSALS = {
    "max-tokens-too-large": ("fake-gpt-4o-mini", {"max_tokens": 20_000}),
    "any-400": ("fault-400", {}),
}


@pytest.mark.parametrize(("upstream", "ask"), PROVIDER_REFUSALS.values(), ids=PROVIDER_REFUSALS.keys())
def test_a_fallback_its_provider_refuses_is_skipped_and_the_client_gets_the_models_own_failure(gateway, upstream, ask):
    """The client got the fallback's provider's 400, about a model it did not ask for, on a request the model it asked
    for takes: an invalid row, and an SDK that never retries. The fallback is skipped (never asked again), and the
    client gets the model's own 503, which a retry may get past."""
    model("backup", "fake-openai", upstream)
    model("primary", "fake-openai", "fault-503", fallbacks=["backup"])

    with pytest.raises(openai.APIStatusError) as failed:
        gateway.client().chat.completions.create(model="primary", messages=HELLO, **ask)

    assert_the_models_own_503(failed.value)
    assert [entry["body"]["model"] for entry in gateway.upstream.requests] == ["fault-503", upstream]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("upstream", "ask"), PROVIDER_REFUSALS.values(), ids=PROVIDER_REFUSALS.keys())
def test_the_next_fallback_answers_when_ones_provider_refuses_the_request(gateway, upstream, ask, stream):
    model("backup", "fake-openai", upstream)
    model("open", "fake-anthropic", "fake-claude-haiku")
    model("primary", "fake-openai", "fault-503", fallbacks=["backup", "open"])

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="primary", messages=HELLO, stream=stream, **ask
    )

    if stream:
        assert "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    else:
        assert raw.parse().choices[0].message.content
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.status == "ok" and record.model_name == "open" and record.attempts == 3


def test_a_fallbacks_provider_refusal_moves_on_to_its_other_deployment(gateway):
    """Never asked again on the deployment that refused it; its model's other deployment (another provider, which
    may take what the first refuses) is tried."""
    backup = model("backup", "fake-openai", "fault-400")
    DeploymentFactory(
        model=backup, provider=Provider.objects.get(name="fake-anthropic"), upstream_id="fake-claude-haiku"
    )
    CatalogModel.objects.filter(pk=backup.pk).update(strategy="priority")
    Deployment.objects.filter(model=backup, upstream_id="fake-claude-haiku").update(priority=2)
    model("primary", "fake-openai", "fault-503", fallbacks=["backup"])

    raw = gateway.client().chat.completions.with_raw_response.create(model="primary", messages=HELLO)

    assert raw.parse().choices[0].message.content
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.status == "ok" and record.model_name == "backup" and record.attempts == 3
    assert [entry["body"]["model"] for entry in gateway.upstream.requests].count("fault-400") == 1


def test_the_model_asked_for_still_answers_its_providers_400(gateway):
    model("backup", "fake-openai", "fake-gpt-4o-mini")
    model("primary", "fake-openai", "fault-400", fallbacks=["backup"])

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="primary", messages=HELLO)

    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "invalid" and record.model_name == "primary"
    assert [entry["body"]["model"] for entry in gateway.upstream.requests] == ["fault-400"]


def test_when_the_model_and_its_fallbacks_all_fail_the_error_names_each_model_tried_and_its_failure(gateway):
    """The model asked for failed (its 503), then its fallback (a 429): the client got the fallback's 429 alone,
    "The provider 'fake-openai' is rate limiting the gateway", naming neither model, nor that the one it asked for
    had failed too. The answer is still the last failure (its status, code and Retry-After: a retry may get past it),
    its message naming each model tried, on which deployment, and how it failed."""
    model("backup", "fake-openai", "fault-429")
    model("primary", "fake-openai", "fault-503", fallbacks=["backup"])

    with pytest.raises(openai.RateLimitError) as failed:
        gateway.client().chat.completions.create(model="primary", messages=HELLO)

    assert failed.value.code == "upstream_rate_limited" and failed.value.response.headers["retry-after"] == "2"
    message = failed.value.body["message"]
    assert message.startswith("The provider 'fake-openai' is rate limiting the gateway"), message
    assert "`primary` (fake-openai: upstream_unavailable)" in message, message
    assert "`backup` (fake-openai: upstream_rate_limited)" in message, message
    assert message.index("`primary`") < message.index("`backup`")
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert record.model_name == "backup" and record.requested_model == "primary" and record.attempts == 2


@pytest.mark.parametrize(("upstream", "ask"), PROVIDER_REFUSALS.values(), ids=PROVIDER_REFUSALS.keys())
def test_a_skipped_fallbacks_refusal_is_not_masked_by_the_models_own_failure(gateway, upstream, ask, caplog):
    """The fallback's provider refused the request (its 400), which may say the request itself is wrong: the client
    got the model's own 503 with no word of it. The 503 is still the answer (the model asked
    for may take the request, and a retry may reach it), its message quoting the fallback's refusal."""
    model("backup", "fake-openai", upstream)
    model("primary", "fake-openai", "fault-503", fallbacks=["backup"])

    with pytest.raises(openai.APIStatusError) as failed:
        gateway.client().chat.completions.create(model="primary", messages=HELLO, **ask)

    assert_the_models_own_503(failed.value)
    message = failed.value.body["message"]
    assert "`primary` (fake-openai: upstream_unavailable)" in message, message
    refusal = message[message.index("`backup` (fake-openai: ") :]
    assert ("max_tokens" in refusal) if upstream == "fake-gpt-4o-mini" else ("400" in refusal), message
    # The operator is told too: a fallback refusing what its model took may be set up wrong. No text of the request.
    warned = [
        r.getMessage() for r in caplog.records if r.name == "chat.pipeline" and "fallback model" in r.getMessage()
    ]
    assert len(warned) == 1 and warned[0].startswith("fallback model backup refused the request on deployment "), warned
    assert warned[0].endswith("; skipped") and "hello" not in warned[0], warned
