"""A model the caller's plan or key does not allow is answered on /v1 as a model that does not exist is: OpenAI's 404
``model_not_found`` ("does not exist or you do not have access to it"), Anthropic's ``not_found_error`` on
/v1/messages, as ``models.retrieve`` answers it. A 403 told a key which models exist; the rejected ledger row still
says why (``model_not_allowed``)."""

from __future__ import annotations

import anthropic
import openai
import pytest

from billing.models import Plan
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.models import CatalogModel, ModelMode, Provider
from tests.factories import ModelFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)


def narrow_key(gateway) -> str:
    """A key of the gateway's user that may use ``claude-test`` alone."""
    allowed = [CatalogModel.objects.get(name="claude-test")]
    return api_key_create(user=gateway.user, name="narrow", allowed_models=allowed).secret


def embedding_model() -> None:
    ModelFactory(
        name="embed-test",
        provider=Provider.objects.get(name="fake-openai"),
        upstream_id="fake-embedding-small",
        mode=ModelMode.EMBEDDING,
    )


CALLS = {
    "chat": lambda client, model: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}]
    ),
    "chat-stream": lambda client, model: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True
    ),
    "responses": lambda client, model: client.responses.create(model=model, input="hi"),
    "embeddings": lambda client, model: client.embeddings.create(model=model, input="hi"),
    "retrieve": lambda client, model: client.models.retrieve(model),
}


def refusal(call, client, model: str) -> openai.NotFoundError:
    with pytest.raises(openai.APIStatusError) as refused:
        call(client, model)
    assert isinstance(refused.value, openai.NotFoundError), (refused.value.status_code, refused.value.body)
    return refused.value


@pytest.mark.parametrize("operation", list(CALLS))
def test_a_model_the_key_may_not_use_is_a_404_like_a_model_that_does_not_exist(gateway, operation):
    embedding_model()
    model = "embed-test" if operation == "embeddings" else "gpt-test"
    client = gateway.client(api_key=narrow_key(gateway))

    forbidden = refusal(CALLS[operation], client, model)
    unknown = refusal(CALLS[operation], client, "no-such-model")

    assert forbidden.body == {**unknown.body, "message": unknown.body["message"].replace("no-such-model", model)}
    assert forbidden.body["code"] == "model_not_found" and forbidden.body["param"] == "model", forbidden.body
    assert "does not exist or you do not have access to it" in forbidden.body["message"]
    if operation != "retrieve":
        row = wait_for_record(forbidden.response.headers["x-request-id"])
        assert (row.status, row.error_type, row.model_name) == ("rejected", "model_not_allowed", model)
    assert gateway.upstream.requests_served() == 0


def test_a_model_outside_the_plan_is_a_404_with_the_plans_reason_on_the_row(gateway):
    plan_assign(user=gateway.user, plan=Plan.objects.create(name="Nothing", allow_all_models=False))

    forbidden = refusal(CALLS["chat"], gateway.client(), "gpt-test")

    assert forbidden.body["code"] == "model_not_found" and "Nothing" not in forbidden.body["message"]
    row = wait_for_record(forbidden.response.headers["x-request-id"])
    assert (row.status, row.error_type) == ("rejected", "model_not_allowed")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_on_the_messages_api_it_is_anthropics_not_found_error(gateway, stream):
    client = anthropic.Anthropic(base_url=gateway.url, api_key=narrow_key(gateway), max_retries=0, timeout=20)

    def ask(model: str) -> anthropic.NotFoundError:
        with pytest.raises(anthropic.APIStatusError) as refused:
            client.messages.create(
                model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}], stream=stream
            )
        assert isinstance(refused.value, anthropic.NotFoundError), (refused.value.status_code, refused.value.body)
        return refused.value

    forbidden, unknown = ask("gpt-test"), ask("no-such-model")

    assert forbidden.body["error"]["type"] == "not_found_error"
    assert forbidden.body == {
        **unknown.body,
        "error": {
            **unknown.body["error"],
            "message": unknown.body["error"]["message"].replace("no-such-model", "gpt-test"),
        },
    }
    row = wait_for_record(forbidden.response.headers["x-request-id"])
    assert (row.status, row.error_type) == ("rejected", "model_not_allowed")
    assert gateway.upstream.requests_served() == 0


# Requests a check that reads the model refuses; a model the key may not use must not reach that check either.
REFUSED_BY_THE_MODEL = {
    "wrong-mode": ("embed-test", lambda client, model: CALLS["chat"](client, model)),
    "no-streaming": ("no-stream-test", lambda client, model: CALLS["chat-stream"](client, model)),
    "output-limit": (
        "short-test",
        lambda client, model: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1000
        ),
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_BY_THE_MODEL))
def test_a_model_the_key_may_not_use_is_a_404_before_any_check_of_the_model(gateway, case):
    embedding_model()
    fake_openai = Provider.objects.get(name="fake-openai")
    ModelFactory(name="no-stream-test", provider=fake_openai, supports_streaming=False)
    ModelFactory(name="short-test", provider=fake_openai, max_output_tokens=100)
    model, call = REFUSED_BY_THE_MODEL[case]
    client = gateway.client(api_key=narrow_key(gateway))

    forbidden = refusal(call, client, model)
    unknown = refusal(call, client, "no-such-model")

    assert forbidden.body == {**unknown.body, "message": unknown.body["message"].replace("no-such-model", model)}
    row = wait_for_record(forbidden.response.headers["x-request-id"])
    assert (row.status, row.error_type, row.model_name) == ("rejected", "model_not_allowed", model)
    # The key's own model is still refused by the check, as before.
    with pytest.raises(openai.BadRequestError):
        call(gateway.client(), model)
    assert gateway.upstream.requests_served() == 0


def test_count_tokens_answers_a_model_the_key_may_not_use_before_its_mode(gateway):
    embedding_model()
    client = anthropic.Anthropic(base_url=gateway.url, api_key=narrow_key(gateway), max_retries=0, timeout=20)

    def ask(model: str) -> anthropic.NotFoundError:
        with pytest.raises(anthropic.APIStatusError) as refused:
            client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hi"}])
        assert isinstance(refused.value, anthropic.NotFoundError), (refused.value.status_code, refused.value.body)
        return refused.value

    forbidden, unknown = ask("embed-test"), ask("no-such-model")

    assert forbidden.body["error"] == {
        **unknown.body["error"],
        "message": unknown.body["error"]["message"].replace("no-such-model", "embed-test"),
    }
