"""Prompt templates run through the pipeline (``chat.prompt_runs.prompt_run``), against the real pipeline, the
fake upstream and the database: the brand in the system message, JSON found in prose, the one repair, the
limits reported, a ledger row per request, and template versions as an experiment's variants.

The fake upstream answers a template's user message by its directives, which a variable's value carries:
``[[reply=...]]`` is the first reply, ``[[then=...]]`` the reply to the repair that follows it."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async

from billing.models import UsageRecord, UsageStatus
from billing.services.ledger import ledger_flush
from chat.pipeline import Caller
from chat.prompt_runs import prompt_run
from core.exceptions import ApplicationError
from experiments.layout import bucket_of
from experiments.models import Experiment, ExperimentStatus, Variant
from prompts.models import BrandProfile, PromptKind, PromptLabel, PromptTemplate, PromptVersion
from providers.models import ModerationChecker, ModerationPolicy
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

AD_SCHEMA = {
    "type": "object",
    "properties": {"headline": {"type": "string"}, "description": {"type": "string"}},
    "required": ["headline", "description"],
    "additionalProperties": False,
}
AD_MESSAGES = [
    {"role": "system", "content": "You write search ads. Answer with JSON: a headline and a description."},
    {"role": "user", "content": "Write an ad for {{ product }}. {{ notes }}"},
]
AD_VARIABLES = [
    {"name": "product", "type": "string", "description": "What the ad sells."},
    {"name": "notes", "type": "string", "default": ""},
]
GOOD_AD = {"headline": "Bread baked at dawn", "description": "Sourdough from our oven to your table."}
LONG_HEADLINE = "The freshest sourdough bread in the whole city"  # 46 characters, over the 30 allowed


def ad_template(slug: str = "search-ad") -> PromptVersion:
    """A template for ad copy (Google-style limits: headline 30, description 90 characters), version 1,
    labelled ``production``."""
    template = PromptTemplate.objects.create(slug=slug, kind=PromptKind.AD_COPY, platform="google")
    version = PromptVersion.objects.create(
        template=template,
        number=1,
        messages=AD_MESSAGES,
        variables=AD_VARIABLES,
        output_schema=AD_SCHEMA,
        field_limits={"headline": 30, "description": 90},
    )
    PromptLabel.objects.create(template=template, name="production", version=version)
    return version


def text_version(template: PromptTemplate, number: int, system: str) -> PromptVersion:
    """A free-text version (no output schema) whose system message says ``system``."""
    return PromptVersion.objects.create(
        template=template,
        number=number,
        messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": "Write a tagline for {{ product }}."},
        ],
        variables=[{"name": "product", "type": "string"}],
    )


def brand_lighthouse() -> BrandProfile:
    return BrandProfile.objects.create(
        name="Lighthouse Bakery",
        slug="lighthouse",
        voice="A cheerful lighthouse keeper who bakes before sunrise.",
        tone="warm, plain-spoken, never pushy",
        audience="Neighbours who walk past on their way to work.",
        style_rules="Short sentences.\nNo exclamation marks.",
        words_to_avoid=["synergy", "artisanal"],
        example_copy="The loaves are out. The kettle is on.",
    )


def reply(data: object) -> str:
    """A ``[[reply=...]]`` directive answering ``data`` (JSON, or text as it is)."""
    return f"[[reply={data if isinstance(data, str) else json.dumps(data)}]]"


def then(data: object) -> str:
    return f"[[then={data if isinstance(data, str) else json.dumps(data)}]]"


def caller_for(user) -> Caller:
    return Caller(user_id=user.pk, username=user.username)


def upstream_chats(fake_upstream) -> list[dict]:
    return [r["body"] for r in fake_upstream.requests if r["path"].endswith("/chat/completions")]


async def ledger_rows(request_ids: list[str]) -> dict[str, UsageRecord]:
    await ledger_flush()
    rows = await sync_to_async(list)(UsageRecord.objects.filter(request_id__in=request_ids))
    return {row.request_id: row for row in rows}


@pytest.fixture
def alice_caller(alice) -> Caller:
    return caller_for(alice)


async def test_a_run_with_a_brand_puts_the_brand_voice_in_the_system_message(chat_model, fake_upstream, alice_caller):
    await sync_to_async(ad_template)()
    await sync_to_async(brand_lighthouse)()

    result = await prompt_run(
        caller=alice_caller,
        slug="search-ad",
        variables={"product": "sourdough", "notes": reply(GOOD_AD)},
        brand="lighthouse",
        model=chat_model.name,
    )

    (sent,) = upstream_chats(fake_upstream)
    system = sent["messages"][0]
    assert system["role"] == "system"
    assert system["content"].startswith("You write search ads.")
    assert "A cheerful lighthouse keeper who bakes before sunrise." in system["content"]
    assert "warm, plain-spoken, never pushy" in system["content"]
    assert '"synergy"' in system["content"]  # the words to avoid are named to the model
    assert sent["messages"][1] == {"role": "user", "content": f"Write an ad for sourdough. {reply(GOOD_AD)}"}
    assert "prompt" not in sent
    assert (result.template, result.version, result.model) == ("search-ad", 1, chat_model.name)
    assert result.output == GOOD_AD and result.valid and result.ok and not result.repaired


async def test_json_wrapped_in_prose_is_parsed(chat_model, fake_upstream, alice_caller):
    await sync_to_async(ad_template)()
    chatty = f"Sure! Here is an ad that should work well: {json.dumps(GOOD_AD)} Let me know if you want another."

    result = await prompt_run(
        caller=alice_caller,
        slug="search-ad",
        variables={"product": "sourdough", "notes": reply(chatty)},
        model=chat_model.name,
    )

    assert result.raw == chatty
    assert result.output == GOOD_AD
    assert (result.valid, result.ok, result.repaired, result.attempts) == (True, True, False, 1)
    assert len(upstream_chats(fake_upstream)) == 1


async def test_json_in_a_code_fence_of_a_streamed_reply_is_parsed(chat_model, fake_upstream, alice_caller):
    await sync_to_async(ad_template)()
    fenced = f"Here you go: ```json {json.dumps(GOOD_AD)} ``` Enjoy."

    result = await prompt_run(
        caller=alice_caller,
        slug="search-ad",
        variables={"product": "sourdough", "notes": reply(fenced)},
        model=chat_model.name,
        stream=True,
    )

    assert result.output == GOOD_AD and result.ok
    assert upstream_chats(fake_upstream)[0]["stream"] is True
    row = (await ledger_rows(result.request_ids))[result.request_ids[0]]
    assert row.stream is True and row.status == UsageStatus.OK and row.ttft_ms is not None


async def test_an_invalid_reply_is_repaired_once_with_the_validation_error(chat_model, fake_upstream, alice_caller):
    await sync_to_async(ad_template)()
    missing_description = {"headline": "Bread baked at dawn"}

    result = await prompt_run(
        caller=alice_caller,
        slug="search-ad",
        variables={"product": "sourdough", "notes": reply(missing_description) + " " + then(GOOD_AD)},
        model=chat_model.name,
    )

    first, second = upstream_chats(fake_upstream)
    # The repair is the same conversation, the bad reply and what was wrong with it.
    assert second["messages"][: len(first["messages"])] == first["messages"]
    assert second["messages"][-2] == {"role": "assistant", "content": json.dumps(missing_description)}
    repair = second["messages"][-1]
    assert repair["role"] == "user" and "'description' is a required property" in repair["content"]
    assert result.output == GOOD_AD and result.raw == json.dumps(GOOD_AD)
    assert (result.valid, result.ok, result.repaired, result.attempts) == (True, True, True, 2)
    assert result.errors == []

    rows = await ledger_rows(result.request_ids)
    assert len(result.request_ids) == 2 and set(rows) == set(result.request_ids)
    assert all(row.status == UsageStatus.OK and row.cost > 0 for row in rows.values())
    assert result.cost == sum((row.cost for row in rows.values()), Decimal(0))
    assert result.usage["prompt_tokens"] == sum(row.prompt_tokens for row in rows.values())
    assert result.usage["completion_tokens"] == sum(row.completion_tokens for row in rows.values())


async def test_a_repair_that_is_invalid_too_is_reported_invalid_after_exactly_two_calls(
    chat_model, fake_upstream, alice_caller
):
    await sync_to_async(ad_template)()

    result = await prompt_run(
        caller=alice_caller,
        slug="search-ad",
        variables={"product": "sourdough", "notes": reply("I would rather not write JSON today.")},
        model=chat_model.name,
    )

    # No [[then=...]]: the fake upstream echoes the repair message, which is no JSON either.
    assert fake_upstream.stats["requests"] == 2
    second = upstream_chats(fake_upstream)[1]
    assert "could not be read as JSON" in second["messages"][-1]["content"]
    assert result.valid is False and result.ok is False and result.output is None
    assert result.repaired is True and result.attempts == 2
    assert result.errors and "JSON" in result.errors[0]
    rows = await ledger_rows(result.request_ids)
    assert len(rows) == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_a_repair_stopped_after_its_tokens_were_billed_is_in_the_runs_cost(
    chat_model, fake_upstream, alice_caller, stream
):
    # The repair's reply is stopped by the model's output policy: its tokens are billed (its ledger row), so
    # the run's usage and cost, "both requests together", must count them, while the output stays the first's.
    await sync_to_async(ad_template)()

    def output_policy() -> None:
        chat_model.moderation_policy = ModerationPolicy.objects.create(
            name="output-only",
            checker=ModerationChecker.BLOCKLIST,
            blocklist="adipiscing",
            check_input=False,
            stream_interval_chars=1,
        )
        chat_model.save()

    await sync_to_async(output_policy)()

    result = await prompt_run(
        caller=alice_caller,
        slug="search-ad",
        variables={"product": "rye", "notes": reply("no JSON here") + then("lorem ipsum dolor adipiscing elit sed")},
        model=chat_model.name,
        stream=stream,
    )

    assert (result.output, result.raw, result.valid, result.repaired, result.attempts) == (
        None,
        "no JSON here",
        False,
        False,
        2,
    )
    assert "The repair request failed" in result.errors[-1]
    rows = await ledger_rows(result.request_ids)
    assert rows[result.request_ids[1]].cost > 0
    assert result.cost == sum(row.cost for row in rows.values())
    assert result.usage["completion_tokens"] == sum(row.completion_tokens for row in rows.values())
    assert result.usage["prompt_tokens"] == sum(row.prompt_tokens for row in rows.values())


async def test_a_headline_over_its_limit_is_reported_per_field(chat_model, fake_upstream, alice_caller):
    await sync_to_async(ad_template)()
    too_long = {"headline": LONG_HEADLINE, "description": "Sourdough from our oven to your table."}

    result = await prompt_run(
        caller=alice_caller,
        slug="search-ad",
        variables={"product": "sourdough", "notes": reply(too_long) + " " + then(too_long)},
        model=chat_model.name,
    )

    # Over a limit is a failed check: the model was asked once to shorten it, and did not.
    second = upstream_chats(fake_upstream)[1]
    assert "headline: over its limit of 30 characters by 16" in second["messages"][-1]["content"]
    assert result.output == too_long
    assert result.valid is True  # the schema holds
    assert result.ok is False and result.attempts == 2
    checks = {check["field"]: check for check in result.checks}
    assert checks["headline"]["length"] == len(LONG_HEADLINE) == 46
    assert checks["headline"]["limit"] == 30 and checks["headline"]["ok"] is False
    assert checks["headline"]["problems"] == ["over its limit of 30 characters by 16"]
    assert checks["description"]["ok"] is True and checks["description"]["limit"] == 90


async def test_a_word_the_brand_avoids_is_reported(chat_model, fake_upstream, alice_caller):
    await sync_to_async(ad_template)()
    await sync_to_async(brand_lighthouse)()
    avoided = {"headline": "Artisanal bread", "description": "Sourdough from our oven to your table."}

    result = await prompt_run(
        caller=alice_caller,
        slug="search-ad",
        variables={"product": "sourdough", "notes": reply(avoided) + " " + then(GOOD_AD)},
        brand="lighthouse",
        model=chat_model.name,
    )

    second = upstream_chats(fake_upstream)[1]
    assert "uses 'artisanal', which the brand avoids" in second["messages"][-1]["content"]
    assert result.output == GOOD_AD and result.ok and result.repaired


async def test_free_text_is_answered_as_text_without_a_repair(chat_model, fake_upstream, alice_caller):
    template = await sync_to_async(PromptTemplate.objects.create)(slug="tagline")
    await sync_to_async(text_version)(template, 1, "You write taglines.")

    result = await prompt_run(
        caller=alice_caller,
        slug="tagline",
        variables={"product": "sourdough [[reply=Bread worth waking up for.]]"},
        model=chat_model.name,
    )

    assert result.output == result.raw == "Bread worth waking up for."
    assert (result.ok, result.repaired, result.attempts, result.checks) == (True, False, 1, [])
    assert fake_upstream.stats["requests"] == 1


async def test_a_refused_run_gets_its_rejected_ledger_row(chat_model, fake_upstream, alice_caller):
    await sync_to_async(ad_template)()

    with pytest.raises(ApplicationError) as refused:
        await prompt_run(caller=alice_caller, slug="search-ad", variables={"product": 12}, model=chat_model.name)

    assert refused.value.status_code == 400 and refused.value.param == "prompt.variables.product"
    await ledger_flush()
    row = await UsageRecord.objects.aget(user_id=alice_caller.user_id)
    assert row.status == UsageStatus.REJECTED and row.model_name == chat_model.name
    assert fake_upstream.stats["requests"] == 0


async def test_a_variable_with_a_blocked_word_in_disguise_is_refused_before_the_upstream(
    chat_model, fake_upstream, alice_caller
):
    """Full-width letters and a zero-width space took a blocked word past the block-list (docs/moderation.md)."""
    await sync_to_async(ad_template)()

    def input_policy() -> None:
        chat_model.moderation_policy = ModerationPolicy.objects.create(name="house", blocklist="forbidden")
        chat_model.save()

    await sync_to_async(input_policy)()

    with pytest.raises(ApplicationError) as refused:
        await prompt_run(
            caller=alice_caller,
            slug="search-ad",
            variables={"product": "ｆｏｒ\u200bｂｉｄｄｅｎ rye"},
            model=chat_model.name,
        )

    assert refused.value.status_code == 400 and refused.value.code == "content_policy_violation"
    assert fake_upstream.stats["requests"] == 0


async def test_a_variable_rendered_into_a_templates_assistant_turn_is_checked_as_input(
    chat_model, fake_upstream, alice_caller
):
    """A template's example reply (an assistant turn) with a variable in it: the client's value was exempt from the
    input check as an earlier reply of the model, and went upstream."""

    def few_shot() -> None:
        template = PromptTemplate.objects.create(slug="few-shot")
        PromptVersion.objects.create(
            template=template,
            number=1,
            messages=[
                {"role": "user", "content": "Give me an example."},
                {"role": "assistant", "content": "For example: {{ example }}"},
                {"role": "user", "content": "Another one."},
            ],
            variables=[{"name": "example", "type": "string"}],
        )
        chat_model.moderation_policy = ModerationPolicy.objects.create(name="house", blocklist="forbidden")
        chat_model.save()

    await sync_to_async(few_shot)()

    with pytest.raises(ApplicationError) as refused:
        await prompt_run(
            caller=alice_caller, slug="few-shot", variables={"example": "the forbidden word"}, model=chat_model.name
        )

    assert refused.value.status_code == 400 and refused.value.code == "content_policy_violation"
    assert fake_upstream.stats["requests"] == 0


async def test_a_templates_own_text_is_not_checked_only_what_the_caller_gives(chat_model, fake_upstream, alice_caller):
    """An admin's few-shot example reply (or system text) holding a blocked word refused every run of the template:
    the rendered messages were read as the caller's input. The template is the admin's text, trusted; only the
    variables the caller gives are read (each as a text of its own, the field named ``prompt.variables.<name>``)."""

    def few_shot() -> None:
        template = PromptTemplate.objects.create(slug="few-shot")
        PromptVersion.objects.create(
            template=template,
            number=1,
            messages=[
                {"role": "system", "content": "Never say the forbidden word."},
                {"role": "user", "content": "Give me an example."},
                {"role": "assistant", "content": "The forbidden word is not an example."},
                {"role": "user", "content": "Another one, about {{ topic }}."},
            ],
            variables=[{"name": "topic", "type": "string"}, {"name": "tags", "type": "array", "default": []}],
        )
        chat_model.moderation_policy = ModerationPolicy.objects.create(
            name="house", blocklist="forbidden", check_output=False
        )
        chat_model.save()

    await sync_to_async(few_shot)()

    result = await prompt_run(
        caller=alice_caller, slug="few-shot", variables={"topic": "rye [[reply=Rye it is.]]"}, model=chat_model.name
    )
    assert (result.output, result.attempts) == ("Rye it is.", 1)
    assert fake_upstream.stats["requests"] == 1

    with pytest.raises(ApplicationError) as refused:
        await prompt_run(
            caller=alice_caller,
            slug="few-shot",
            variables={"topic": "rye", "tags": ["bread", "ｆｏｒｂｉｄｄｅｎ"]},
            model=chat_model.name,
        )
    assert refused.value.status_code == 400 and refused.value.code == "content_policy_violation"
    assert refused.value.param == "prompt.variables.tags"
    assert fake_upstream.stats["requests"] == 1
    rows = await ledger_rows([refused.value.extra["headers"]["x-request-id"]])
    (row,) = rows.values()
    assert row.status == UsageStatus.REJECTED
    assert "entry 1 at character 0 of prompt.variables.tags" in row.moderation


async def test_an_openai_policy_is_not_asked_about_a_run_that_gives_no_text_of_its_own(
    chat_model, fake_upstream, alice_caller
):
    """The template's text is the admin's, trusted: a run whose caller gives no variable (nor tools) has no input
    of the caller's to read, and asks the moderation service nothing, rather than a question about empty text or
    about the template. A run that gives a variable asks about it alone."""

    def fixed_prompt() -> None:
        template = PromptTemplate.objects.create(slug="fixed")
        PromptVersion.objects.create(
            template=template,
            number=1,
            messages=[{"role": "user", "content": "[[reply=Rye it is.]] Suggest a bread. [flag:violence]"}],
            variables=[{"name": "notes", "type": "string", "default": "[flag:violence]"}],
        )
        chat_model.moderation_policy = ModerationPolicy.objects.create(
            name="safety",
            checker=ModerationChecker.OPENAI,
            moderation_provider=chat_model.deployments.get().provider,
            check_output=False,
        )
        chat_model.save()

    await sync_to_async(fixed_prompt)()

    result = await prompt_run(caller=alice_caller, slug="fixed", variables={}, model=chat_model.name)
    assert result.output == "Rye it is."
    assert [r["path"] for r in fake_upstream.requests] == ["/v1/chat/completions"]
    rows = await ledger_rows(result.request_ids)
    assert [row.moderation for row in rows.values()] == [""]

    await prompt_run(caller=alice_caller, slug="fixed", variables={"notes": "rye"}, model=chat_model.name)
    asked = [r["body"]["input"] for r in fake_upstream.requests if r["path"] == "/v1/moderations"]
    assert asked == ["rye"]


async def test_a_repair_does_not_read_the_models_first_reply_as_input(chat_model, fake_upstream, alice_caller):
    """The repair sends the model's first reply back as an assistant turn: the server's own, not the client's
    text (the rendered messages were read by the first request's check). It is not read as input."""
    await sync_to_async(ad_template)()

    def input_policy() -> None:
        chat_model.moderation_policy = ModerationPolicy.objects.create(
            name="house", blocklist="adipiscing", check_output=False
        )
        chat_model.save()

    await sync_to_async(input_policy)()

    result = await prompt_run(
        caller=alice_caller,
        slug="search-ad",
        variables={"product": "rye", "notes": "[[words=10]] " + then(GOOD_AD)},
        model=chat_model.name,
    )

    assert (result.output, result.repaired, result.attempts, result.errors) == (GOOD_AD, True, 2, [])
    chats = [r["body"] for r in fake_upstream.requests if r["path"].endswith("/chat/completions")]
    assert "adipiscing" in chats[1]["messages"][-2]["content"]


# TEMPLATE VERSIONS AS AN EXPERIMENT'S VARIANTS


def versions_experiment(model, template: PromptTemplate) -> tuple[Experiment, dict[str, Variant]]:
    """A running experiment on ``model``: half the users get version 1 of ``template``, half version 2."""
    v1 = text_version(template, 1, "You are the plain copywriter (version one).")
    v2 = text_version(template, 2, "You are the playful copywriter (version two).")
    PromptLabel.objects.create(template=template, name="production", version=v1)
    experiment = Experiment.objects.create(name="tagline-voice", model=model, salt="salt-for-tests")
    variants = {
        "plain": Variant.objects.create(
            experiment=experiment, name="plain", is_control=True, prompt_version=v1, allocation=50, position=0
        ),
        "playful": Variant.objects.create(
            experiment=experiment, name="playful", prompt_version=v2, allocation=50, position=1
        ),
    }
    experiment.layout = [[0, 5000, variants["plain"].pk], [5000, 10000, variants["playful"].pk]]
    experiment.status = ExperimentStatus.RUNNING
    experiment.save()
    return experiment, variants


def user_in(variant: str, salt: str = "salt-for-tests"):
    """A new user whose bucket falls in the first half (``plain``) or the second (``playful``)."""
    while True:
        user = UserFactory()
        if (bucket_of(salt, f"user:{user.pk}") < 5000) == (variant == "plain"):
            return user


async def test_each_user_runs_their_variants_template_version(chat_model, fake_upstream):
    template = await sync_to_async(PromptTemplate.objects.create)(slug="tagline")
    experiment, variants = await sync_to_async(versions_experiment)(chat_model, template)
    plain_user = await sync_to_async(user_in)("plain")
    playful_user = await sync_to_async(user_in)("playful")

    results = {}
    for name, user in (("plain", plain_user), ("playful", playful_user)):
        # Both ask for the production label (version 1); the experiment decides.
        results[name] = await prompt_run(
            caller=caller_for(user),
            slug="tagline",
            label="production",
            variables={"product": "bread"},
            model=chat_model.name,
        )

    plain_sent, playful_sent = upstream_chats(fake_upstream)
    assert plain_sent["messages"][0]["content"] == "You are the plain copywriter (version one)."
    assert playful_sent["messages"][0]["content"] == "You are the playful copywriter (version two)."
    assert (results["plain"].version, results["playful"].version) == (1, 2)
    assert results["plain"].experiment == "tagline-voice:plain"
    assert results["playful"].experiment == "tagline-voice:playful"
    for name, result in results.items():
        (row,) = (await ledger_rows(result.request_ids)).values()
        assert row.experiment_id == experiment.pk
        assert row.experiment_variant_id == variants[name].pk


async def test_a_variant_never_swaps_in_another_templates_version(chat_model, fake_upstream):
    tagline = await sync_to_async(PromptTemplate.objects.create)(slug="tagline")
    await sync_to_async(versions_experiment)(chat_model, tagline)
    other = await sync_to_async(PromptTemplate.objects.create)(slug="other")
    await sync_to_async(text_version)(other, 1, "You are another template altogether.")
    playful_user = await sync_to_async(user_in)("playful")

    result = await prompt_run(
        caller=caller_for(playful_user), slug="other", variables={"product": "bread"}, model=chat_model.name
    )

    (sent,) = upstream_chats(fake_upstream)
    assert sent["messages"][0]["content"] == "You are another template altogether."
    assert (result.template, result.version, result.experiment) == ("other", 1, "tagline-voice:playful")


async def test_a_caller_whose_variables_the_variants_version_does_not_take_is_left_out_not_refused(
    chat_model, fake_upstream
):
    """Version 2 requires a variable version 1 (the one asked for) does not have: a caller in its variant would get
    a 400 naming a variable they were never told of. They run the version they asked for, out of the experiment."""
    template = await sync_to_async(PromptTemplate.objects.create)(slug="tagline")
    await sync_to_async(versions_experiment)(chat_model, template)
    await PromptVersion.objects.filter(template=template, number=2).aupdate(
        variables=[{"name": "product", "type": "string"}, {"name": "audience", "type": "string", "required": True}]
    )
    playful_user = await sync_to_async(user_in)("playful")

    result = await prompt_run(
        caller=caller_for(playful_user),
        slug="tagline",
        label="production",
        variables={"product": "bread"},
        model=chat_model.name,
    )

    (sent,) = upstream_chats(fake_upstream)
    assert sent["messages"][0]["content"] == "You are the plain copywriter (version one)."
    assert (result.version, result.experiment) == (1, None)
    (row,) = (await ledger_rows(result.request_ids)).values()
    assert (row.experiment_id, row.experiment_variant_id) == (None, None)
