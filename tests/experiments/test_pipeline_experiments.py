"""The experiment in the pipeline, through a live server with the official ``openai`` SDK and the chat
WebSocket: the header, the ledger's experiment and variant, who answers a variant, its overrides, the
untouched share, callers left out, rejected requests."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import pytest
from asgiref.sync import sync_to_async

from billing.models import Plan, UsageStatus
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from experiments.assignment import assignment_unit
from experiments.layout import bucket_of, layout_owner
from providers.models import ProviderKind
from tests.chat.conftest import ends, events_until, open_socket
from tests.factories import ProviderFactory, UserFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hello there"}]


def client_for(server, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=30)


def variant_of(ab, unit: str) -> str | None:
    """The variant the experiment's layout gives ``unit``, read off the layout the factory stored (not
    through the code under test)."""
    owner = layout_owner(ab.experiment.layout, bucket_of(ab.experiment.salt, unit))
    return {ab.control.pk: "control", ab.treatment.pk: "treatment", None: None}[owner]


def end_user_in(ab, api_key, variant: str | None) -> str:
    """An end user (the request's ``user`` field) of ``api_key`` whom the experiment puts in ``variant``."""
    for n in range(10_000):
        unit = assignment_unit(user_id=api_key.user_id, api_key_id=api_key.pk, end_user=f"end-{n}")
        if variant_of(ab, unit) == variant:
            return f"end-{n}"
    raise AssertionError(f"no end user in {variant}")


def upstream_bodies(fake_upstream) -> list[dict]:
    return [r["body"] for r in fake_upstream.requests if r["path"].endswith("/chat/completions")]


def chat_in(server, ab, created, variant: str | None, **request: Any):
    """A chat completion on ``ab-model`` (the raw response) with ``created``'s key, for the end user of that key whom
    the experiment puts in ``variant``."""
    return client_for(server, created.secret).chat.completions.with_raw_response.create(
        model="ab-model", messages=HELLO, user=end_user_in(ab, created.api_key, variant), **request
    )


def assert_left_out(raw) -> None:
    """Served as though there were no experiment: a 200 that names none, and no experiment on its ledger row."""
    assert raw.status_code == 200
    assert "x-llmhub-experiment" not in raw.headers
    record = wait_for_record(raw.headers["x-request-id"], timeout=15)
    assert (record.experiment_id, record.experiment_variant_id) == (None, None)


def test_rest_replies_say_their_variant_which_its_deployment_answers_with_its_overrides(
    llmhub_server, fake_upstream, ab_experiment
):
    ab = ab_experiment(control=40, treatment=40, overrides={"temperature": 0.25})
    created = api_key_create(user=UserFactory(username="app"), name="app")
    client = client_for(llmhub_server, created.secret)

    for variant in ("control", "treatment"):
        fake_upstream.reset()
        end_user = end_user_in(ab, created.api_key, variant)
        raw = client.chat.completions.with_raw_response.create(
            model="ab-model", messages=HELLO, user=end_user, temperature=0.9
        )
        assert raw.status_code == 200 and raw.parse().choices[0].message.content
        assert raw.headers["x-llmhub-experiment"] == f"ab-test:{variant}"
        assert raw.headers["x-llmhub-deployment"] == variant
        (body,) = upstream_bodies(fake_upstream)
        assert body["model"] == f"fake-{variant}"
        # The treatment's override replaces the client's temperature; the control leaves it alone.
        assert body["temperature"] == (0.25 if variant == "treatment" else 0.9)
        record = wait_for_record(raw.headers["x-request-id"], timeout=15)
        assert record.status == UsageStatus.OK
        assert record.experiment_id == ab.experiment.pk
        assert record.experiment_variant_id == getattr(ab, variant).pk

        fake_upstream.reset()
        raw = client.chat.completions.with_raw_response.create(
            model="ab-model", messages=HELLO, user=end_user, stream=True
        )
        assert raw.headers["x-llmhub-experiment"] == f"ab-test:{variant}"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        assert text
        (body,) = upstream_bodies(fake_upstream)
        assert body["model"] == f"fake-{variant}" and body["stream"] is True
        record = wait_for_record(raw.headers["x-request-id"], timeout=15)
        assert record.stream is True
        assert (record.experiment_id, record.experiment_variant_id) == (ab.experiment.pk, getattr(ab, variant).pk)


def test_the_untouched_share_has_no_header_and_no_experiment_on_its_row(llmhub_server, fake_upstream, ab_experiment):
    ab = ab_experiment(control=30, treatment=30, overrides={"temperature": 0.25})
    created = api_key_create(user=UserFactory(username="app"), name="app")
    raw = chat_in(llmhub_server, ab, created, None)
    assert_left_out(raw)
    (body,) = upstream_bodies(fake_upstream)
    assert "temperature" not in body


def test_a_model_variant_is_answered_by_the_other_model(llmhub_server, fake_upstream, ab_experiment):
    ab = ab_experiment(control=50, treatment=50, treatment_model=True)
    created = api_key_create(user=UserFactory(username="app"), name="app")
    raw = chat_in(llmhub_server, ab, created, "treatment")
    assert raw.headers["x-llmhub-experiment"] == "ab-test:treatment"
    assert raw.headers["x-llmhub-model"] == "ab-model-other"
    (body,) = upstream_bodies(fake_upstream)
    assert body["model"] == "fake-other"
    record = wait_for_record(raw.headers["x-request-id"], timeout=15)
    assert (record.experiment_id, record.experiment_variant_id) == (ab.experiment.pk, ab.treatment.pk)


@pytest.mark.parametrize("restricted_by", ["plan", "key"])
def test_a_caller_whose_plan_or_key_does_not_allow_the_model_variant_is_left_out(
    llmhub_server, fake_upstream, ab_experiment, restricted_by
):
    ab = ab_experiment(control=50, treatment=50, treatment_model=True)
    user = UserFactory(username="basic")
    if restricted_by == "plan":
        plan = Plan.objects.create(name="experiment-model-only")
        plan.allowed_models.add(ab.model)
        plan_assign(user=user, plan=plan)
        created = api_key_create(user=user, name="app")
    else:
        created = api_key_create(user=user, name="app", allowed_models=[ab.model])
    raw = chat_in(llmhub_server, ab, created, "treatment")
    assert_left_out(raw)  # served as usual, not counted in the experiment
    assert raw.headers["x-llmhub-model"] == "ab-model"
    (body,) = upstream_bodies(fake_upstream)
    assert body["model"] in ("fake-control", "fake-treatment")


def test_a_request_refused_after_assignment_records_its_variant(llmhub_server, fake_upstream, ab_experiment):
    ab = ab_experiment(control=50, treatment=50)
    created = api_key_create(
        user=UserFactory(username="broke"), name="app", budget_usd=Decimal("0"), budget_period="total"
    )
    end_user = end_user_in(ab, created.api_key, "treatment")
    with pytest.raises(openai.APIStatusError) as refused:
        client_for(llmhub_server, created.secret).chat.completions.create(
            model="ab-model", messages=HELLO, user=end_user
        )
    assert upstream_bodies(fake_upstream) == []
    record = wait_for_record(refused.value.response.headers["x-request-id"], timeout=15)
    assert record.status == UsageStatus.REJECTED
    assert (record.experiment_id, record.experiment_variant_id) == (ab.experiment.pk, ab.treatment.pk)


async def test_a_websocket_reply_says_its_experiment(fake_upstream, ab_experiment):
    ab = await sync_to_async(ab_experiment)(control=50, treatment=50)
    users = [await sync_to_async(UserFactory)(username=f"chatter-{n}") for n in range(40)]
    wanted = {
        variant: next(u for u in users if variant_of(ab, f"user:{u.pk}") == variant)
        for variant in ("control", "treatment")
    }
    for variant, user in wanted.items():
        ws, connected, _ = await open_socket(user=user)
        try:
            assert connected
            await ws.send_json_to(
                {"type": "chat.send", "conversation": None, "model": "ab-model", "content": "hi", "request_id": "r1"}
            )
            events = await events_until(ws, ends("r1"))
            started = events[0]
            assert started["type"] == "chat.started" and events[-1]["type"] == "chat.completed", events[-1]
            assert started["experiment"] == f"ab-test:{variant}"
            assert started["deployment"] == variant
        finally:
            await ws.disconnect()


def test_an_anthropic_messages_request_gets_the_overrides_that_api_has(llmhub_server, fake_upstream, ab_experiment):
    """/v1/messages speaks Anthropic's parameters: a variant's ``stop`` arrives as the stop sequence, its
    ``max_completion_tokens`` as ``max_tokens``, and ``seed`` (which that API lacks) is left out rather than
    sent to be refused; the request is in the experiment like any other."""
    import anthropic

    ab = ab_experiment(
        control=50,
        treatment=50,
        overrides={"temperature": 0.25, "stop": "ZZZ", "seed": 7, "max_completion_tokens": 40},
    )
    for n in range(200):
        user = UserFactory(username=f"claude-user-{n}")
        if variant_of(ab, assignment_unit(user_id=user.pk, api_key_id=None)) == "treatment":
            break
    created = api_key_create(user=user, name="messages")
    client = anthropic.Anthropic(base_url=llmhub_server.url, api_key=created.secret, max_retries=0, timeout=30)

    raw = client.messages.with_raw_response.create(
        model="ab-model", max_tokens=100, messages=[{"role": "user", "content": "hello there"}]
    )

    assert raw.status_code == 200 and raw.parse().content
    assert raw.headers["x-llmhub-experiment"] == "ab-test:treatment"
    (body,) = upstream_bodies(fake_upstream)
    assert body["temperature"] == 0.25
    assert body["stop"] == ["ZZZ"]
    assert body.get("max_tokens", body.get("max_completion_tokens")) == 40
    assert "seed" not in body
    record = wait_for_record(raw.headers["x-request-id"], timeout=15)
    assert (record.experiment_id, record.experiment_variant_id) == (ab.experiment.pk, ab.treatment.pk)


def test_an_anthropic_clients_end_users_are_assigned_by_metadata_user_id(llmhub_server, fake_upstream, ab_experiment):
    """Anthropic's Messages API names the end user in ``metadata.user_id`` (it has no ``user`` field): an app
    serving its users through one key had them all put in the key's one variant; each is now its own unit."""
    import anthropic

    ab = ab_experiment(control=50, treatment=50)
    created = api_key_create(user=UserFactory(username="claude-app"), name="app")
    client = anthropic.Anthropic(base_url=llmhub_server.url, api_key=created.secret, max_retries=0, timeout=30)

    for variant in ("control", "treatment"):
        raw = client.messages.with_raw_response.create(
            model="ab-model",
            max_tokens=20,
            metadata={"user_id": end_user_in(ab, created.api_key, variant)},
            messages=[{"role": "user", "content": "hello there"}],
        )
        assert raw.headers["x-llmhub-experiment"] == f"ab-test:{variant}"


@pytest.mark.parametrize("treatment_model", [False, True])
def test_a_text_completion_is_left_out_of_a_variant_that_cannot_complete(
    llmhub_server, fake_upstream, ab_experiment, treatment_model
):
    """A variant served by a chat-only provider (its deployment, or its other model's) cannot continue a text: a
    ``/v1/completions`` caller it would take is served as usual and left out of the experiment, not refused."""
    ab = ab_experiment(control=50, treatment=50, treatment_model=treatment_model)
    chat_only = ProviderFactory(name="chat-only", kind=ProviderKind.ANTHROPIC, base_url=fake_upstream.base_url)
    ab.treatment_served_by(chat_only)
    created = api_key_create(user=UserFactory(username="app"), name="app")
    end_user = end_user_in(ab, created.api_key, "treatment")
    raw = client_for(llmhub_server, created.secret).completions.with_raw_response.create(
        model="ab-model", prompt="[[reply=done]]", user=end_user
    )
    assert raw.parse().choices[0].text == "done"
    assert "x-llmhub-experiment" not in raw.headers
    assert raw.headers["x-llmhub-model"] == "ab-model"
    record = wait_for_record(raw.headers["x-request-id"], timeout=15)
    assert (record.operation, record.experiment_id) == ("completions", None)


@pytest.mark.parametrize("treatment_model", [False, True])
def test_a_caller_without_the_own_key_a_variant_requires_is_left_out_not_refused(
    llmhub_server, fake_upstream, ab_experiment, treatment_model
):
    """A variant served only on users' own keys (its deployment's provider, or every deployment of its other
    model, is ``byok: required``) cannot serve a caller without such a key: they are left out of the
    experiment and served as usual, like a caller whose plan does not allow a model variant. Before, they got
    403 ``own_key_required`` for a model the platform's key serves them; a caller with their own key is in it."""
    from providers.fields import Secret
    from providers.models import ByokMode, CredentialStatus, ProviderCredential

    ab = ab_experiment(control=50, treatment=50, treatment_model=treatment_model)
    own_keys_only = ProviderFactory(
        name="own-keys-only", base_url=fake_upstream.base_url + "/v1", byok=ByokMode.REQUIRED
    )
    ab.treatment_served_by(own_keys_only)
    without = api_key_create(user=UserFactory(username="no-own-key"), name="app")
    raw = chat_in(llmhub_server, ab, without, "treatment")
    assert_left_out(raw)
    assert raw.headers["x-llmhub-model"] == "ab-model"

    owner = UserFactory(username="own-key")
    ProviderCredential.objects.create(
        owner=owner,
        provider=own_keys_only,
        api_key="sk-fake-upstream-key-0000000000000000",  # the fake upstream's key: it answers
        hint=Secret("sk-fake-upstream-key-0000000000000000").hint,
        status=CredentialStatus.VALID,
    )
    with_key = api_key_create(user=owner, name="app")
    raw = chat_in(llmhub_server, ab, with_key, "treatment")
    assert raw.headers["x-llmhub-experiment"] == "ab-test:treatment"
    record = wait_for_record(raw.headers["x-request-id"], timeout=15)
    assert record.billing_source == "user_key"
    assert (record.experiment_id, record.experiment_variant_id) == (ab.experiment.pk, ab.treatment.pk)


@pytest.mark.parametrize("asks", ["stream", "max_tokens"])
def test_a_caller_whose_request_the_variants_model_cannot_honour_is_left_out_not_refused(
    llmhub_server, fake_upstream, ab_experiment, asks
):
    """A model variant whose other model does not stream, or writes fewer tokens than the client's output limit,
    cannot serve that request: the caller is left out of the experiment and served as usual by the model they
    asked for. Before, they got a 400 naming the variant's model, which they never asked for ("The model
    `ab-model-other` does not support streaming.")."""
    ab = ab_experiment(control=50, treatment=50, treatment_model=True)
    if asks == "stream":
        ab.target_model.supports_streaming = False
    else:
        ab.target_model.max_output_tokens = 100
    ab.target_model.save()
    created = api_key_create(user=UserFactory(username="app"), name="app")
    raw = chat_in(
        llmhub_server, ab, created, "treatment", **({"stream": True} if asks == "stream" else {"max_tokens": 500})
    )
    assert_left_out(raw)
    assert raw.headers["x-llmhub-model"] == "ab-model"
    (body,) = upstream_bodies(fake_upstream)
    assert body["model"] in ("fake-control", "fake-treatment")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_caller_in_a_variant_whose_overrides_the_model_cannot_honour_is_left_out_not_refused(
    llmhub_server, fake_upstream, ab_experiment, field
):
    """A variant's override past what its model writes at most (``max_tokens: 4000`` on a model that writes 1000)
    would answer every caller in it a 400 naming a field they never sent: they are left out of the experiment and
    served as they asked instead."""
    ab = ab_experiment(control=50, treatment=50, overrides={field: 4000})
    ab.model.max_output_tokens = 1000
    ab.model.save()
    created = api_key_create(user=UserFactory(username="app"), name="app")
    raw = chat_in(llmhub_server, ab, created, "treatment")
    assert_left_out(raw)
    (body,) = upstream_bodies(fake_upstream)
    assert field not in body
