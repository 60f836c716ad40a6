"""The prompt templates over HTTP, against a live llmhub and the fake upstream: ``POST /api/prompts/{slug}/run``
with a gateway key, a JWT or the web session, ``GET /api/prompts/``, and ``/v1/chat/completions`` with the
``prompt`` extension through the official openai SDK (``extra_body``). Errors in the API's JSON shape."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.roles import Role, role_set
from billing.models import ApiKey, UsageRecord, UsageStatus
from billing.services.keys import api_key_create
from experiments.layout import bucket_of
from prompts.models import PromptLabel, PromptTemplate, PromptVersion
from tests.accounts.conftest import identity_provider_server, idp, jwt_on  # noqa: F401 (fixtures)
from tests.chat.conftest import session_cookie
from tests.chat.test_prompt_runs import (
    GOOD_AD,
    ad_template,
    brand_lighthouse,
    reply,
    then,
    versions_experiment,
)
from tests.test_openapi_schema import validator_for
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CSRF_TOKEN = "k" * 32


@pytest.fixture
def key(alice, chat_model, llmhub_server) -> str:
    return api_key_create(user=alice, name="prompts").secret


def api(server, key: str | None = None, **headers: str) -> httpx.Client:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=server.url, headers=headers, timeout=20)


def sdk(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=20)


def wait_for_rows(request_ids: list[str], timeout: float = 10.0) -> dict[str, UsageRecord]:
    rows: dict[str, UsageRecord] = {}

    def all_there() -> bool:
        rows.clear()
        rows.update((row.request_id, row) for row in UsageRecord.objects.filter(request_id__in=request_ids))
        return len(rows) == len(request_ids)

    wait_until(all_there, lambda: f"ledger rows for {request_ids} (there are for {sorted(rows)})", timeout=timeout)
    return rows


def upstream_chats(fake_upstream) -> list[dict]:
    return [r["body"] for r in fake_upstream.requests if r["path"].endswith("/chat/completions")]


def template_request_refused(server, key: str, model: str, extra: dict) -> openai.APIStatusError:
    """The error ``/v1/chat/completions`` answers a template request (``extra``: its ``prompt`` extension) with,
    once its ``rejected`` ledger row is there."""
    with pytest.raises(openai.APIStatusError) as refused:
        sdk(server, key).chat.completions.create(model=model, messages=openai.NOT_GIVEN, extra_body=extra)
    (row,) = wait_for_rows([refused.value.response.headers["x-request-id"]]).values()
    assert row.status == UsageStatus.REJECTED
    return refused.value


def integer_template_refused(
    server, key: str, model: str, *, slug: str, content: str, variable: str, asked: int
) -> str:
    """A template of one user message, ``content``, taking one integer ``variable`` (2 by default): it answers at
    its default, and a caller's ``asked`` value is refused with a 400 naming ``prompt``. The refusal's message."""
    template = PromptTemplate.objects.create(slug=slug)
    PromptVersion.objects.create(
        template=template,
        number=1,
        messages=[{"role": "user", "content": content}],
        variables=[{"name": variable, "type": "integer", "default": 2}],
    )
    answered = sdk(server, key).chat.completions.create(
        model=model, messages=openai.NOT_GIVEN, extra_body={"prompt": {"slug": slug}}
    )
    assert answered.choices[0].message.content

    refused = template_request_refused(server, key, model, {"prompt": {"slug": slug, "variables": {variable: asked}}})
    assert refused.status_code == 400
    assert refused.body["param"] == "prompt"
    return refused.body["message"]


def documented(server, component: str, body: dict) -> None:
    """``body`` is what the OpenAPI document says ``component`` is (what a generated client would expect)."""
    schema = httpx.get(server.url + "/api/schema/", params={"format": "json"}, timeout=60).json()
    validator_for(schema, component).validate(body)


def error_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


# POST /api/prompts/{slug}/run


def test_a_run_answers_the_parsed_output_with_its_checks_and_ledger_rows(llmhub_server, fake_upstream, chat_model, key):
    ad_template()
    brand_lighthouse()
    chatty = f"Here is your ad: {json.dumps(GOOD_AD)} Hope you like it."

    response = api(llmhub_server, key).post(
        "/api/prompts/search-ad/run",
        json={
            "model": chat_model.name,
            "brand": "lighthouse",
            "variables": {"product": "sourdough", "notes": reply(chatty)},
        },
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output"] == GOOD_AD and body["raw"] == chatty
    assert (body["valid"], body["ok"], body["repaired"], body["attempts"]) == (True, True, False, 1)
    assert (body["template"], body["version"], body["model"]) == ("search-ad", 1, chat_model.name)
    assert {check["field"] for check in body["checks"]} == {"headline", "description"}
    assert body["experiment"] is None
    documented(llmhub_server, "PromptRunResult", body)
    assert response.headers["x-llmhub-prompt"] == "search-ad:v1"
    assert response.headers["x-request-id"] == body["request_ids"][0]
    (sent,) = upstream_chats(fake_upstream)
    assert "A cheerful lighthouse keeper who bakes before sunrise." in sent["messages"][0]["content"]
    rows = wait_for_rows(body["request_ids"])
    (row,) = rows.values()
    assert row.status == UsageStatus.OK and row.endpoint == "rest" and row.api_key_id is not None
    assert Decimal(body["cost"]) == row.cost > 0
    assert (row.prompt_tokens, row.completion_tokens) == (
        body["usage"]["prompt_tokens"],
        body["usage"]["completion_tokens"],
    )


def test_a_repaired_run_reports_both_requests_each_with_its_ledger_row(llmhub_server, fake_upstream, chat_model, key):
    ad_template()

    response = api(llmhub_server, key).post(
        "/api/prompts/search-ad/run",
        json={"model": chat_model.name, "variables": {"product": "rye", "notes": reply("no JSON") + then(GOOD_AD)}},
    )

    body = response.json()
    assert response.status_code == 200, body
    assert (body["output"], body["repaired"], body["attempts"], body["valid"]) == (GOOD_AD, True, 2, True)
    assert response.headers["x-llmhub-prompt"] == "search-ad:v1"  # the repair ran that version's conversation
    assert response.headers["x-request-id"] == body["request_ids"][1]
    assert len(upstream_chats(fake_upstream)) == 2
    rows = wait_for_rows(body["request_ids"])
    assert set(rows) == set(body["request_ids"]) and len(rows) == 2
    assert body["usage"]["total_tokens"] == sum(r.prompt_tokens + r.completion_tokens for r in rows.values())


def test_a_session_user_may_run_a_template(llmhub_server, fake_upstream, chat_model, alice):
    ad_template()
    client = api(llmhub_server, **{"X-CSRFToken": CSRF_TOKEN})
    client.cookies.set(settings.SESSION_COOKIE_NAME, session_cookie(alice))
    client.cookies.set(settings.CSRF_COOKIE_NAME, CSRF_TOKEN)

    response = client.post(
        "/api/prompts/search-ad/run",
        json={"model": chat_model.name, "version": 1, "variables": {"product": "rye", "notes": reply(GOOD_AD)}},
    )

    assert response.status_code == 200, response.text
    assert response.json()["output"] == GOOD_AD
    (row,) = wait_for_rows(response.json()["request_ids"]).values()
    assert row.user_id == alice.pk and row.api_key_id is None


def test_a_jwt_user_may_run_a_template(llmhub_server, fake_upstream, chat_model, jwt_on):  # noqa: F811
    ad_template()

    response = api(llmhub_server, jwt_on.token()).post(
        "/api/prompts/search-ad/run",
        json={"model": chat_model.name, "variables": {"product": "rye", "notes": reply(GOOD_AD)}},
    )

    assert response.status_code == 200, response.text
    (row,) = wait_for_rows(response.json()["request_ids"]).values()
    assert row.user.username == "ada" and row.api_key_id is None


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"),
    [
        ("/api/prompts/no-such-template/run", {"variables": {"product": "rye"}}, 404, "prompt"),
        ("/api/prompts/search-ad/run", {"variables": {"product": 7}}, 400, "variables.product"),
        ("/api/prompts/search-ad/run", {"variables": {}}, 400, "variables.product"),
        ("/api/prompts/search-ad/run", {"variables": {"product": "rye", "colour": "red"}}, 400, "variables.colour"),
        (
            "/api/prompts/search-ad/run",
            {"variables": {"product": "rye"}, "version": 1, "label": "production"},
            400,
            "label",
        ),
        ("/api/prompts/search-ad/run", {"variables": {"product": "rye"}, "version": 9}, 404, "version"),
        ("/api/prompts/search-ad/run", {"variables": {"product": "rye"}, "label": "staging"}, 404, "label"),
        ("/api/prompts/search-ad/run", {"variables": {"product": "rye"}, "brand": "nobody"}, 404, "brand"),
        ("/api/prompts/search-ad/run", {"variables": {"product": "rye"}, "model": "no-such-model"}, 404, "model"),
        ("/api/prompts/search-ad/run", {"variables": "product=rye"}, 400, "variables"),
    ],
)
def test_errors_are_clear_json_and_nothing_goes_upstream(
    llmhub_server, fake_upstream, chat_model, key, path, payload, status, param
):
    ad_template()
    brand_lighthouse()

    response = api(llmhub_server, key).post(path, json={"model": chat_model.name, **payload})

    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param and error["message"]
    assert upstream_chats(fake_upstream) == []
    if "x-request-id" in response.headers:  # refused by the run, not by the body's shape
        (row,) = wait_for_rows([response.headers["x-request-id"]]).values()
        assert row.status == UsageStatus.REJECTED
    else:
        assert param == "variables" and not UsageRecord.objects.exists()


@pytest.mark.parametrize("typo", ["lable", "brnad", "varaibles", "temperature"])
def test_a_field_the_run_does_not_take_is_a_400_not_silently_ignored(
    llmhub_server, fake_upstream, chat_model, key, typo
):
    # A misspelt label or brand would otherwise run `production` without the brand, and the caller would
    # never know; the /v1 extension refuses the same typo inside `prompt`.
    ad_template()
    brand_lighthouse()
    payload = {"model": chat_model.name, "variables": {"product": "rye", "notes": reply(GOOD_AD)}, typo: "staging"}

    response = api(llmhub_server, key).post("/api/prompts/search-ad/run", json=payload)

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == typo and typo in error["message"] and "label" in error["message"]
    assert upstream_chats(fake_upstream) == []


def test_a_viewer_may_not_run_a_template_and_no_key_is_a_401(llmhub_server, fake_upstream, chat_model, key, alice):
    ad_template()
    payload = {"model": chat_model.name, "variables": {"product": "rye"}}

    assert api(llmhub_server).post("/api/prompts/search-ad/run", json=payload).status_code == 401
    role_set(alice, Role.VIEWER)
    refused = api(llmhub_server, key).post("/api/prompts/search-ad/run", json=payload)

    assert refused.status_code == 403 and error_of(refused)["type"] == "permission_error"
    assert upstream_chats(fake_upstream) == []


# GET /api/prompts/


def test_the_list_says_kinds_labels_latest_version_and_variables(llmhub_server, chat_model, key):
    version = ad_template()
    PromptVersion.objects.create(
        template=version.template,
        number=2,
        messages=version.messages,
        variables=[*version.variables, {"name": "tone", "type": "string", "required": False}],
        output_schema=version.output_schema,
        field_limits=version.field_limits,
        note="A tone to ask for",
    )
    PromptTemplate.objects.create(slug="empty-template")
    unlabelled = PromptTemplate.objects.create(slug="draft-only")
    PromptVersion.objects.create(template=unlabelled, number=1, messages=version.messages, note="draft")

    response = api(llmhub_server, key).get("/api/prompts/")

    assert response.status_code == 200, response.text
    listed = {item["slug"]: item for item in response.json()["results"]}
    ad = listed["search-ad"]
    assert (ad["kind"], ad["platform"], ad["labels"]) == ("ad_copy", "google", {"production": 1})
    latest = ad["latest_version"]
    assert latest["number"] == 2 and latest["note"] == "A tone to ask for"
    assert latest["variables"] == [
        {"name": "product", "type": "string", "required": True, "description": "What the ad sells."},
        {"name": "notes", "type": "string", "required": False, "default": ""},
        {"name": "tone", "type": "string", "required": False},
    ]
    assert latest["field_limits"] == {"headline": 30, "description": 90}
    assert latest["output_schema"]["required"] == ["headline", "description"]
    assert listed["empty-template"]["latest_version"] is None
    # A run naming no version runs production's (v1, without `tone`): the variables to send for it.
    default = ad["default_version"]
    assert default["number"] == 1 and [v["name"] for v in default["variables"]] == ["product", "notes"]
    assert listed["empty-template"]["default_version"] is None
    assert listed["draft-only"]["default_version"]["note"] == "draft"  # no production label: the latest
    for item in listed.values():
        documented(llmhub_server, "PromptTemplateSummary", item)


@pytest.mark.parametrize("query", ["limit=100000000000000000000", "offset=100000000000000000000", "limit=1001"])
def test_the_list_takes_any_limit_and_offset_without_a_500(llmhub_server, chat_model, key, query):
    ad_template()

    response = api(llmhub_server, key).get(f"/api/prompts/?{query}")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == 1
    assert [item["slug"] for item in body["results"]] == ([] if query.startswith("offset") else ["search-ad"])


def test_the_list_reads_each_templates_latest_version_only(alice):
    # A template edited 30 times holds 30 versions; the list shows the latest, and read all 30 (every one's
    # messages, 60 KB each here) for each template of the page, and every labelled version's too.
    version = ad_template()
    big = [{"role": "system", "content": "Rules.\n" + "Keep it short. " * 4_000}, *version.messages[1:]]
    for number in range(2, 31):
        PromptVersion.objects.create(
            template=version.template, number=number, messages=big, variables=version.variables, note=f"v{number}"
        )
    PromptLabel.objects.create(template=version.template, name="staging", version=PromptVersion.objects.get(number=7))
    client = Client()
    client.force_login(alice)

    with CaptureQueriesContext(connection) as queries:
        response = client.get("/api/prompts/")

    assert response.status_code == 200
    (item,) = response.json()["results"]
    assert item["latest_version"]["note"] == "v30"
    assert item["default_version"]["number"] == 1  # production's, read without its messages
    assert item["labels"] == {"production": 1, "staging": 7}
    read = [q["sql"] for q in queries.captured_queries if '"messages"' in q["sql"]]
    with connection.cursor() as cursor:
        rows = sum(len(cursor.execute(sql).fetchall()) for sql in read)
    assert rows == 1  # the latest version's content, once


# /v1/chat/completions WITH THE prompt EXTENSION


def test_the_openai_sdk_runs_a_template_with_the_prompt_extension(llmhub_server, fake_upstream, chat_model, key):
    ad_template()
    brand_lighthouse()

    raw = sdk(llmhub_server, key).chat.completions.with_raw_response.create(
        model=chat_model.name,
        messages=openai.NOT_GIVEN,
        extra_body={
            "prompt": {
                "slug": "search-ad",
                "label": "production",
                "brand": "lighthouse",
                "variables": {"product": "sourdough", "notes": reply(GOOD_AD)},
            }
        },
    )

    completion = raw.parse()
    assert json.loads(completion.choices[0].message.content) == GOOD_AD
    assert raw.headers["x-llmhub-prompt"] == "search-ad:v1"
    (sent,) = upstream_chats(fake_upstream)
    assert "prompt" not in sent
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert "A cheerful lighthouse keeper" in sent["messages"][0]["content"]
    assert sent["messages"][1]["content"] == f"Write an ad for sourdough. {reply(GOOD_AD)}"
    (row,) = wait_for_rows([raw.headers["x-request-id"]]).values()
    assert row.status == UsageStatus.OK


def test_a_streamed_template_request_renders_too(llmhub_server, fake_upstream, chat_model, key):
    ad_template()

    with sdk(llmhub_server, key).chat.completions.with_streaming_response.create(
        model=chat_model.name,
        messages=openai.NOT_GIVEN,
        stream=True,
        extra_body={"prompt": {"slug": "search-ad", "variables": {"product": "rye", "notes": reply(GOOD_AD)}}},
    ) as response:
        assert response.headers["x-llmhub-prompt"] == "search-ad:v1"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)

    assert json.loads(text) == GOOD_AD
    (sent,) = upstream_chats(fake_upstream)
    assert sent["stream"] is True and "prompt" not in sent


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"prompt": {"slug": "no-such-template", "variables": {}}}, 404, "prompt"),
        ({"prompt": {"slug": "search-ad", "variables": {"product": ["rye"]}}}, 400, "prompt.variables.product"),
        ({"prompt": {"slug": "search-ad", "version": 1, "label": "production", "variables": {}}}, 400, "prompt.label"),
        ({"prompt": {"slug": "search-ad", "variables": {"product": "rye"}, "brand": "nobody"}}, 404, "prompt.brand"),
        ({"prompt": {"slug": "search-ad", "variables": {"product": "rye"}, "lable": "x"}}, 400, "prompt.lable"),
        ({"prompt": {"variables": {"product": "rye"}}}, 400, "prompt.slug"),
        # A NUL no name can hold (PostgreSQL refused the lookup: a 500).
        ({"prompt": {"slug": "search\x00-ad", "variables": {"product": "rye"}}}, 400, "prompt.slug"),
        ({"prompt": {"slug": "search-ad", "label": "prod\x00", "variables": {"product": "rye"}}}, 400, "prompt.label"),
        ({"prompt": {"slug": "search-ad", "brand": "\x00", "variables": {"product": "rye"}}}, 400, "prompt.brand"),
        ({"prompt": "search-ad"}, 400, "prompt"),
        (
            {
                "prompt": {"slug": "search-ad", "variables": {"product": "rye"}},
                "messages": [{"role": "user", "content": "hi"}],
            },
            400,
            "prompt",
        ),
    ],
)
def test_the_prompt_extensions_errors_name_the_field_and_get_a_rejected_row(
    llmhub_server, fake_upstream, chat_model, key, extra, status, param
):
    ad_template()
    brand_lighthouse()

    refused = template_request_refused(llmhub_server, key, chat_model.name, extra)

    assert refused.status_code == status
    assert refused.body["param"] == param
    assert upstream_chats(fake_upstream) == []


@pytest.mark.parametrize(("model", "code"), [(None, "missing_required_parameter"), (7, "invalid_type")])
def test_a_template_request_without_a_model_name_is_the_400_a_plain_one_gets(
    llmhub_server, fake_upstream, chat_model, key, model, code
):
    ad_template()
    client = api(llmhub_server, key)
    model_field = {} if model is None else {"model": model}
    plain = client.post("/v1/chat/completions", json={**model_field, "messages": [{"role": "user", "content": "hi"}]})

    templated = client.post(
        "/v1/chat/completions",
        json={**model_field, "prompt": {"slug": "search-ad", "variables": {"product": "rye"}}},
    )

    assert plain.status_code == 400 and error_of(plain)["code"] == code
    assert templated.status_code == 400, templated.text
    assert error_of(templated) == error_of(plain)
    assert upstream_chats(fake_upstream) == []


def test_template_versions_as_variants_serve_each_end_user_their_version(
    llmhub_server, fake_upstream, chat_model, key, alice
):
    template = PromptTemplate.objects.create(slug="tagline")
    experiment, variants = versions_experiment(chat_model, template)
    api_key_id = ApiKey.objects.get(user=alice).pk
    # The gateway key serves its own end users (the request's ``user``): each is assigned on their own.
    names = {"plain": None, "playful": None}
    for n in range(200):
        half = "plain" if bucket_of(experiment.salt, f"key:{api_key_id}:user:end-user-{n}") < 5000 else "playful"
        names[half] = names[half] or f"end-user-{n}"
    client = sdk(llmhub_server, key)

    answers = {}
    for variant, end_user in names.items():
        answers[variant] = client.chat.completions.with_raw_response.create(
            model=chat_model.name,
            messages=openai.NOT_GIVEN,
            user=end_user,
            extra_body={"prompt": {"slug": "tagline", "variables": {"product": "bread"}}},
        )

    plain_sent, playful_sent = upstream_chats(fake_upstream)
    assert plain_sent["messages"][0]["content"] == "You are the plain copywriter (version one)."
    assert playful_sent["messages"][0]["content"] == "You are the playful copywriter (version two)."
    for variant, raw in answers.items():
        assert raw.headers["x-llmhub-experiment"] == f"tagline-voice:{variant}"
        assert raw.headers["x-llmhub-prompt"] == f"tagline:v{1 if variant == 'plain' else 2}"
        (row,) = wait_for_rows([raw.headers["x-request-id"]]).values()
        assert (row.experiment_id, row.experiment_variant_id) == (experiment.pk, variants[variant].pk)


def test_the_same_end_user_keeps_their_version_across_requests(llmhub_server, fake_upstream, chat_model, key):
    template = PromptTemplate.objects.create(slug="tagline")
    versions_experiment(chat_model, template)
    client = sdk(llmhub_server, key)

    prompts = {
        client.chat.completions.with_raw_response.create(
            model=chat_model.name,
            messages=openai.NOT_GIVEN,
            user="the-same-reader",
            extra_body={"prompt": {"slug": "tagline", "variables": {"product": "bread"}}},
        ).headers["x-llmhub-prompt"]
        for _ in range(4)
    }

    assert len(prompts) == 1
    assert len({body["messages"][0]["content"] for body in upstream_chats(fake_upstream)}) == 1


def test_a_template_recursing_as_deep_as_a_callers_value_says_so_with_a_400(
    llmhub_server, fake_upstream, chat_model, key
):
    """A macro that calls itself as many times as a caller's value says (an outline nested ``depth`` levels)
    renders at the save check's sample depth; a caller asking for thousands of levels ran Python out of stack,
    a RecursionError the renderer did not catch: a 500. It is a 400 naming the template, with its rejected row."""
    message = integer_template_refused(
        llmhub_server,
        key,
        chat_model.name,
        slug="outline",
        content="{% macro level(n) %}{% if n > 0 %}-{{ level(n - 1) }}{% endif %}{% endmacro %}"
        "Outline {{ level(depth) }}",
        variable="depth",
        asked=100_000,
    )
    assert "too deep" in message


def test_a_template_looping_as_often_as_a_callers_value_says_is_a_400(llmhub_server, fake_upstream, chat_model, key):
    """Nested loops as long as a caller's value says, printing nothing: no bound on the output stopped them (a
    million iterations per thousand asked). They are bounded in all, the template's 400 with its rejected row."""
    message = integer_template_refused(
        llmhub_server,
        key,
        chat_model.name,
        slug="grid",
        content="{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}A grid of {{ n }}.",
        variable="n",
        asked=1000,
    )
    assert "loops run more than 100,000 times" in message
