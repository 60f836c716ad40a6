"""A fallback's own policies, through the openai and anthropic SDKs against a live llmhub and the fake upstream: the
model ``primary`` (its one deployment failing with the fake's ``fault-503``, no retries) falls back to models whose
admins set policies. Each input policy reads the input before its model is tried; a reply is checked by the output
policy of the model that wrote it, and the plan's."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from billing.models import Plan, UsageRecord, UserPlan
from chat.moderation import ReplyGuard
from providers.models import ModerationAction, ModerationChecker, ModerationPolicy, Provider
from providers.moderation import policy_cache
from tests.factories import ModelFactory
from tests.waiting import wait_for_record, wait_until

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


# OUTPUT: the reply is checked by the output policy of the model that wrote it, and the plan's.


def output_blocklist(name: str, words: str = "forbidden") -> ModerationPolicy:
    """A policy that reads replies only: the prompt may name the word the reply must not."""
    return ModerationPolicy.objects.create(name=name, blocklist=words, check_input=False)


def anthropic_model(
    name: str, upstream: str = "fake-claude-haiku", *, policy: ModerationPolicy | None = None, **fields
):
    provider = Provider.objects.get(name="fake-anthropic")
    fields.setdefault("retries", 0)
    return ModelFactory(name=name, provider=provider, upstream_id=upstream, moderation_policy=policy, **fields)


def messages_client(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)


REPLY = [{"role": "user", "content": "[[reply=the forbidden word]]"}]


def only_record() -> UsageRecord:
    """The test's one ledger row, once written (a stream cut in-band leaves no header to name it by)."""
    return wait_until(lambda: UsageRecord.objects.first(), "the ledger row")


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_fallbacks_output_policy_checks_the_reply_it_writes(gateway, stream):
    """``primary`` has no policy and fails; ``guarded``, whose admin blocks "forbidden" in its replies, answers.
    Its reply was relayed unchecked, whole and streamed; now its own output policy reads it."""
    model("guarded", "fake-o3-mini", policy=output_blocklist("guard-out"))
    model("primary", "fault-503", fallbacks=["guarded"])
    pieces: list[str] = []

    with pytest.raises(openai.APIError) as stopped:
        response = gateway.client().chat.completions.create(model="primary", messages=REPLY, stream=stream)
        for chunk in response if stream else ():
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)

    assert 'content policy "guard-out"' in stopped.value.message
    assert "forbidden" not in "".join(pieces)
    assert asked(gateway.upstream, "fake-o3-mini") == 1
    record = only_record()
    assert UsageRecord.objects.count() == 1
    assert record.model_name == "guarded" and record.error_type == "content_policy_violation" and record.cost > 0
    assert record.moderation == 'blocked output: blocklist (entry 1 at character 4), policy "guard-out"'


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_fallbacks_output_policy_checks_the_message_it_writes(gateway, stream):
    anthropic_model("guarded", policy=output_blocklist("guard-out"))
    anthropic_model("primary", "fault-503", fallbacks=["guarded"])
    request = {"model": "primary", "max_tokens": 50, "messages": REPLY}
    pieces: list[str] = []

    with pytest.raises(anthropic.APIError) as stopped:
        if stream:
            with messages_client(gateway).messages.stream(**request) as events:
                pieces.extend(events.text_stream)
        else:
            messages_client(gateway).messages.create(**request)

    assert 'content policy "guard-out"' in str(stopped.value)
    assert "forbidden" not in "".join(pieces)
    record = only_record()
    assert record.model_name == "guarded" and record.error_type == "content_policy_violation"
    assert record.moderation == 'blocked output: blocklist (entry 1 at character 4), policy "guard-out"'


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_the_requested_models_output_policy_does_not_judge_a_reply_its_fallback_wrote(gateway, stream):
    """``primary``'s admin blocks "forbidden" in primary's replies; ``open``, its fallback, has no policy and writes
    the word. Primary's policy judged open's reply, which open's admin allows: the reply comes through now, and
    the row's ``moderation`` is empty."""
    model("open", "fake-gpt-4o-mini")
    model("primary", "fault-503", policy=output_blocklist("primary-out"), fallbacks=["open"])

    raw = gateway.client().chat.completions.with_raw_response.create(model="primary", messages=REPLY, stream=stream)
    if stream:
        text = "".join(choice.delta.content or "" for chunk in raw.parse() for choice in chunk.choices)
    else:
        text = raw.parse().choices[0].message.content

    assert text == "the forbidden word"
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.status == "ok" and record.model_name == "open" and record.moderation == ""


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_the_plans_output_policy_checks_a_fallbacks_reply_beside_its_own(gateway, stream):
    """The plan's policy applies to every reply, whoever wrote it, the fallback's own beside it; the row names the
    policy that acted."""
    plan_policy = ModerationPolicy.objects.create(name="plan rules", blocklist="word", check_input=False)
    plan = Plan.objects.create(name="moderated", allow_all_models=True, moderation_policy=plan_policy)
    UserPlan.objects.create(user=gateway.user, plan=plan)
    model("guarded", "fake-o3-mini", policy=output_blocklist("guard-out", "nothing"))
    model("primary", "fault-503", fallbacks=["guarded"])

    with pytest.raises(openai.APIError) as stopped:
        response = gateway.client().chat.completions.create(model="primary", messages=REPLY, stream=stream)
        for _ in response if stream else ():
            pass

    assert 'content policy "plan rules"' in stopped.value.message
    record = only_record()
    assert record.model_name == "guarded"
    assert record.moderation == 'blocked output: blocklist (entry 1 at character 14), policy "plan rules"'


@pytest.fixture
def guards_built(monkeypatch) -> list[ReplyGuard]:
    """Every reply guard built (the real one, counted as it is made)."""
    built: list[ReplyGuard] = []
    init = ReplyGuard.__init__

    def counted(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(ReplyGuard, "__init__", counted)
    return built


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_no_guard_when_no_candidate_checks_output(gateway, guards_built, stream):
    """The fallback's policy reads input only; the model asked for has none: its reply costs no guard at all."""
    model("guarded", "fake-o3-mini", policy=ModerationPolicy.objects.create(name="in", check_output=False))
    model("primary", "fault-503", fallbacks=["guarded"])

    raw = gateway.client().chat.completions.with_raw_response.create(model="primary", messages=REPLY, stream=stream)
    list(raw.parse()) if stream else raw.parse()

    assert wait_for_record(raw.headers["x-request-id"]).model_name == "guarded"
    assert guards_built == []


def test_no_guard_when_the_model_asked_for_answers_and_only_its_fallback_checks_output(gateway, guards_built):
    model("guarded", "fake-o3-mini", policy=output_blocklist("guard-out"))
    model("primary", "fake-gpt-4o-mini", fallbacks=["guarded"])

    raw = gateway.client().chat.completions.with_raw_response.create(model="primary", messages=REPLY, stream=True)
    text = "".join(choice.delta.content or "" for chunk in raw.parse() for choice in chunk.choices)

    assert text == "the forbidden word"
    assert guards_built == []
    assert gateway.upstream.requests_served(MODERATIONS) == 0


def test_a_stream_resumed_on_a_fallback_is_checked_by_the_fallbacks_output_policy(gateway):
    """``primary`` (no policy, ``resume_on_failure``) is cut after three chunks; the reply goes on from ``guarded``,
    whose admin blocks "forbidden" in its replies. The guard was the one built for primary (none), so guarded's
    words reached the client unchecked; the resumed attempt's reply is checked by its writer's policy."""
    model("guarded", "fake-o3-mini", policy=output_blocklist("guard-out"))
    model("primary", "fault-cut-3", resume_on_failure=True, fallbacks=["guarded"])
    pieces: list[str] = []

    with pytest.raises(openai.APIError) as stopped:
        for chunk in gateway.client().chat.completions.create(
            model="primary",
            messages=[{"role": "user", "content": "[[reply=one two three four forbidden]]"}],
            stream=True,
        ):
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)

    assert 'content policy "guard-out"' in stopped.value.message
    assert "forbidden" not in "".join(pieces)
    assert asked(gateway.upstream, "fake-o3-mini") == 1
    record = only_record()
    assert record.resumed and record.model_name == "guarded" and record.error_type == "content_policy_violation"
    assert 'policy "guard-out"' in record.moderation


def test_a_message_stream_resumed_on_a_fallback_is_checked_by_the_fallbacks_output_policy(gateway):
    anthropic_model("guarded", policy=output_blocklist("guard-out"))
    anthropic_model("primary", "fault-cut-3", resume_on_failure=True, fallbacks=["guarded"])
    request = {
        "model": "primary",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "[[reply=one two three four forbidden]]"}],
    }
    pieces: list[str] = []

    with pytest.raises(anthropic.APIError) as stopped:
        with messages_client(gateway).messages.stream(**request) as events:
            pieces.extend(events.text_stream)

    assert 'content policy "guard-out"' in str(stopped.value)
    assert "forbidden" not in "".join(pieces)
    record = only_record()
    assert record.resumed and record.model_name == "guarded" and 'policy "guard-out"' in record.moderation
