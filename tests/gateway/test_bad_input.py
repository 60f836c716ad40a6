"""No input answers 500 (issue 9, point 4): each reproduction below once did, over the live server.

Every answer is a 4xx in OpenAI's error shape, and a request refused for its body or its method still
gets its ``rejected`` ledger row when its key authenticates.
"""

from __future__ import annotations

import json
import socket
from decimal import Decimal

import httpx
import pytest
from django.conf import settings
from rest_framework.test import APIClient

from billing.models import BudgetPeriod, UsageRecord
from billing.pricing import cost_for
from billing.services.budgets import api_key_limits_set
from providers.models import CatalogModel
from providers.selectors import resolved_model
from tests.factories import UsageRecordFactory, UserFactory
from tests.gateway.test_ledger import settle_quietly
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)


def post(gateway, body: bytes | str, *, key: str | None = None, **headers: str) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else body
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {key or gateway.key}", "Content-Type": "application/json", **headers},
        timeout=20,
    )


def chat(**fields) -> str:
    return json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], **fields})


def assert_openai_error(response: httpx.Response, status: int, *, param=..., code=...) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not ...:
        assert error["param"] == param
    if code is not ...:
        assert error["code"] == code
    return error


def assert_rejected_row(gateway, response: httpx.Response, error_type: str) -> UsageRecord:
    record = wait_for_record(response.headers["x-request-id"])
    settle_quietly()
    assert UsageRecord.objects.count() == 1
    assert record.status == "rejected" and record.error_type == error_type
    assert record.api_key_id == gateway.api_key.pk and record.user_id == gateway.user.pk
    assert record.cost == 0
    return record


@pytest.mark.parametrize("role", [{"name": "user"}, ["user"]])
def test_role_of_the_wrong_type_is_a_400(gateway, role):
    response = post(gateway, json.dumps({"model": "gpt-test", "messages": [{"role": role, "content": "hi"}]}))
    assert_openai_error(response, 400, param="messages[0].role")
    assert_rejected_row(gateway, response, "invalid_value")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    ("logit_bias", "code"),
    [
        ([50256], "invalid_type"),
        ({"50256": "-100"}, "invalid_type"),
        ({"50256": True}, "invalid_type"),
        ({"50256": -101}, "invalid_value"),
        ({"50256": 100.5}, "invalid_value"),
        ({"<|endoftext|>": -100}, "invalid_value"),  # a token's id, not its text
        ({"-1": 5}, "invalid_value"),
    ],
)
def test_a_logit_bias_openai_would_refuse_is_a_400_before_any_call(gateway, path, logit_bias, code):
    """``logit_bias`` maps token ids to a bias of -100 to 100, as OpenAI checks it; until 6 December any value went
    upstream unchecked (OpenAI's 400 after the call, or a bias a compatible server took wrongly)."""
    body = {"model": "gpt-test", "logit_bias": logit_bias}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    response = httpx.post(gateway.url + path, json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20)
    error = assert_openai_error(response, 400, param="logit_bias", code=code)
    assert "'logit_bias'" in error["message"]
    assert gateway.upstream.requests_served() == 0
    assert_rejected_row(gateway, response, code)


def test_a_logit_bias_of_token_ids_and_biases_in_range_goes_upstream_as_it_came(gateway):
    bias = {"50256": -100, "1734": 100, "13": 0.5}
    response = post(gateway, chat(logit_bias=bias))
    assert response.status_code == 200, response.text
    assert gateway.upstream.requests[-1]["body"]["logit_bias"] == bias


@pytest.mark.parametrize("part_type", [{"t": "text"}, ["text"]])
def test_content_part_type_of_the_wrong_type_is_a_400(gateway, part_type):
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": [{"type": part_type, "text": "hi"}]}]}
    response = post(gateway, json.dumps(body))
    assert_openai_error(response, 400, param="messages[0].content[0]")


API_LIMIT = 2**20  # /v1's limit in these tests (LLMHUB_MAX_REQUEST_MB, 32 MB by default: test_request_size.py)


@pytest.fixture
def api_limit(settings) -> int:
    settings.LLMHUB_MAX_REQUEST_BYTES = API_LIMIT
    return API_LIMIT


def test_a_body_over_the_upload_limit_is_a_413_with_its_ledger_row(gateway, api_limit):
    padding = "x" * (api_limit + 1)
    response = post(gateway, chat(user=padding))
    assert_openai_error(response, 413, param=None, code="request_too_large")
    assert_rejected_row(gateway, response, "request_too_large")


def test_a_chunked_body_over_the_upload_limit_is_a_413_too(gateway, api_limit):
    """Without Content-Length, Django's own check does not apply; the size of what arrived does."""
    body = chat(user="x" * (api_limit + 1)).encode()
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=(body[i : i + 65536] for i in range(0, len(body), 65536)),
        headers={"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"},
        timeout=20,
    )
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, code="request_too_large")


def answer_while_still_sending(url: str, head: list[str], sent: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers llmhub answers a request whose body is still arriving: ``head`` (the request line and
    headers) and ``sent`` go out, the rest of the body it announces never does, the socket stays open."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall("\r\n".join([*head, f"Host: {host}:{port}", "", ""]).encode() + sent)
        received = b""
        while b"\r\n\r\n" not in received:
            try:
                part = conn.recv(65536)
            except TimeoutError:
                pytest.fail("llmhub kept reading a body past its upload limit instead of answering")
            assert part, "llmhub closed the connection without an answer"
            received += part
    status_line, *lines = received.split(b"\r\n\r\n")[0].decode().split("\r\n")
    return int(status_line.split()[1]), dict(line.lower().split(": ", 1) for line in lines)


def chunked_past_the_limit(limit: int | None = None) -> bytes:
    """A chunked body past ``limit``: Django's (``DATA_UPLOAD_MAX_MEMORY_SIZE``) unless told."""
    chunk = b"x" * 65536
    count = (limit or settings.DATA_UPLOAD_MAX_MEMORY_SIZE) // 65536 + 2
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(count))


def _head(gateway, header: str) -> list[str]:
    return [
        "POST /v1/chat/completions HTTP/1.1",
        f"Authorization: Bearer {gateway.key}",
        "Content-Type: application/json",
        header,
    ]


def test_a_body_announced_over_the_limit_is_refused_without_reading_it(gateway, api_limit):
    """A Content-Length of 10 GB was read whole (into a temporary file on disk, before any view or key was
    looked at) before the 413: any client, with or without a key, could fill the server's disk."""
    status, headers = answer_while_still_sending(gateway.url, _head(gateway, f"Content-Length: {10**10}"), b"{")
    assert status == 413
    record = wait_for_record(headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "request_too_large"


def test_a_chunked_body_is_refused_once_it_passes_the_limit_without_reading_the_rest(gateway, api_limit):
    head = _head(gateway, "Transfer-Encoding: chunked")
    status, headers = answer_while_still_sending(gateway.url, head, chunked_past_the_limit(api_limit))
    assert status == 413
    record = wait_for_record(headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "request_too_large"


def test_deeply_nested_arrays_are_a_400_with_their_ledger_row(gateway):
    response = post(gateway, "[" * 100_000 + "]" * 100_000)
    assert_openai_error(response, 400, code="invalid_json")
    assert_rejected_row(gateway, response, "invalid_json")


def test_nesting_deeper_than_the_limit_inside_a_valid_body_is_a_400(gateway):
    response = post(gateway, chat(metadata={"a": "[" * 200 + "]" * 200}, user=json.loads("[" * 200 + "]" * 200)))
    assert_openai_error(response, 400, param="user")


def test_a_5000_digit_integer_is_a_400(gateway):
    response = post(gateway, chat()[:-1] + ', "seed": ' + "9" * 5000 + "}")
    assert_openai_error(response, 400, code="invalid_json")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_a_400(gateway, literal):
    response = post(gateway, chat()[:-1] + f', "temperature": {literal}' + "}")
    assert_openai_error(response, 400)


@pytest.mark.parametrize("body", ["[]", "3", '"text"', "null", ""])
def test_a_body_that_is_not_an_object_is_a_400_that_names_no_parameter(gateway, body):
    """The body as a whole is not one of the request's parameters: ``param`` is null, as for bad JSON."""
    response = post(gateway, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] is None and error["type"] == "invalid_request_error"


def test_unparsable_json_with_a_valid_key_is_a_400_with_its_ledger_row(gateway):
    response = post(gateway, '{"model": "gpt-test", "messages": [')
    assert_openai_error(response, 400, code="invalid_json")
    assert_rejected_row(gateway, response, "invalid_json")


def test_huge_max_tokens_on_a_budgeted_key_is_a_400(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("5"), budget_period=BudgetPeriod.MONTHLY)
    response = post(gateway, chat(max_tokens=10**30))
    assert_openai_error(response, 400, param="max_tokens")
    assert_rejected_row(gateway, response, "invalid_value")


def test_the_largest_accepted_max_tokens_is_priced_without_error(gateway):
    """2**31 - 1 tokens, 128 choices, at a price far above any real one: the Decimal math still holds."""
    model = resolved_model(CatalogModel.objects.get(name="gpt-test"))
    cost = cost_for(model=model, prompt_tokens=2**63 - 1, completion_tokens=(2**31 - 1) * 128, cached_tokens=0)
    assert cost > 0


def test_a_lone_surrogate_in_content_is_a_400(gateway):
    response = post(gateway, chat()[:-1].replace('"hi"', '"\\ud800"') + "}")
    assert_openai_error(response, 400, param="messages")
    assert_rejected_row(gateway, response, "invalid_value")
    assert gateway.upstream.requests == []


def test_a_lone_surrogate_in_the_model_name_is_a_400_and_its_row_is_written(gateway):
    response = post(gateway, chat().replace('"gpt-test"', '"gpt\\udfff"'))
    assert_openai_error(response, 400, param="model")
    record = assert_rejected_row(gateway, response, "invalid_value")
    assert record.model_name.startswith("gpt")


def test_a_surrogate_pair_is_a_character_not_an_error(gateway):
    response = post(gateway, chat().replace('"hi"', '"\\ud83d\\ude00"'))
    assert response.status_code == 200, response.text


def test_tool_choice_without_tools_is_a_400(gateway):
    response = post(gateway, chat(tool_choice="required"))
    assert_openai_error(response, 400, param="tool_choice")
    response = post(gateway, chat(tool_choice={"type": "function", "function": {"name": "f"}}))
    assert_openai_error(response, 400, param="tool_choice")


def test_tool_choice_none_without_tools_is_accepted(gateway):
    assert post(gateway, chat(tool_choice="none")).status_code == 200


@pytest.mark.parametrize("choice", [["auto"], 3, {"type": "function"}, {"type": "function", "function": {"name": 1}}])
def test_tool_choice_of_a_wrong_shape_is_a_400(gateway, choice):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    response = post(gateway, chat(tools=tools, tool_choice=choice))
    assert_openai_error(response, 400, param="tool_choice")


@pytest.mark.parametrize(("path", "operation"), [("/v1/chat/completions", "chat"), ("/v1/embeddings", "embeddings")])
def test_get_on_a_post_endpoint_is_a_405_with_its_ledger_row_of_that_operation(gateway, path, operation):
    response = httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {gateway.key}"})
    assert_openai_error(response, 405, code="method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert assert_rejected_row(gateway, response, "method_not_allowed").operation == operation


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/v1/models/gpt-test", "/v1/nothing-here"])
def test_trace_on_v1_is_a_405_in_openai_shape_with_its_ledger_row(gateway, path):
    response = httpx.request("TRACE", gateway.url + path, headers={"Authorization": f"Bearer {gateway.key}"})
    assert_openai_error(response, 405, code="method_not_allowed")
    assert "TRACE" not in response.headers["allow"]
    assert_rejected_row(gateway, response, "method_not_allowed")


def test_trace_without_a_key_is_a_405_and_writes_no_row(gateway):
    response = httpx.request("TRACE", gateway.url + "/v1/models")
    assert_openai_error(response, 405, code="method_not_allowed")
    settle_quietly()
    assert UsageRecord.objects.count() == 0


@pytest.mark.parametrize("path", ["/", "/api/usage/", "/api/schema/", "/admin/login/", "/accounts/login/"])
def test_trace_is_a_405_outside_v1_too(gateway, path):
    response = httpx.request("TRACE", gateway.url + path, headers={"Authorization": f"Bearer {gateway.key}"})
    assert response.status_code == 405, response.text
    assert "TRACE" not in response.headers["allow"]
    assert "authorization" not in response.text.lower()


def test_post_on_a_model_is_a_405(gateway):
    response = httpx.post(gateway.url + "/v1/models/gpt-test", headers={"Authorization": f"Bearer {gateway.key}"})
    assert_openai_error(response, 405, code="method_not_allowed")
    assert response.headers["allow"] == "GET"


# The usage API (/api/usage/): a Django test client is enough, it is served by the full stack.


@pytest.fixture
def usage_client() -> APIClient:
    user = UserFactory(username="carol")
    UsageRecordFactory.create_batch(3, user=user)
    client = APIClient()
    client.force_login(user)
    return client


def test_a_huge_limit_is_clamped_to_the_largest_page(usage_client):
    response = usage_client.get("/api/usage/", {"limit": str(10**20)})
    assert response.status_code == 200, response.content
    assert response.json()["count"] == 3 and len(response.json()["results"]) == 3


def test_a_huge_offset_is_past_the_end(usage_client):
    response = usage_client.get("/api/usage/", {"offset": str(10**20)})
    assert response.status_code == 200, response.content
    assert response.json()["results"] == [] and response.json()["count"] == 3


@pytest.mark.parametrize("path", ["/api/usage/", "/api/usage/summary/"])
def test_dates_at_the_ends_of_the_calendar_are_a_400(usage_client, path):
    response = usage_client.get(path, {"start": "0001-01-01", "end": "9999-12-31"})
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "end"
    response = usage_client.get(path, {"end": "9999-12-31T23:59:59.999999Z"})
    assert response.status_code == 400, response.content


def test_a_summary_over_more_than_a_year_is_a_400(usage_client):
    response = usage_client.get("/api/usage/summary/", {"start": "2024-01-01", "end": "2025-01-02"})
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "end"
    assert usage_client.get("/api/usage/summary/", {"start": "2024-01-01", "end": "2024-12-31"}).status_code == 200


def test_an_api_path_no_route_matches_is_a_json_404_and_a_page_stays_html(usage_client):
    response = usage_client.get("/api/conversations/-1/")
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "unknown_url"
    page = usage_client.get("/no-such-page/")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("name", ["gpt\\u0000", "gpt\\ud800"])
def test_a_model_name_no_column_can_hold_is_a_400_when_creating_a_key(usage_client, name):
    """Found by tests/test_fuzz.py on PostgreSQL, which refuses NUL in text: the lookup was a 500."""
    body = '{"name": "k", "allowed_models": ["' + name + '"]}'
    response = usage_client.post("/api/keys/", body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"].startswith("allowed_models")


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
@pytest.mark.parametrize("parameters", ["x", ["city"], 5, True])
def test_a_tools_parameters_that_are_not_a_json_schema_object_are_a_400_before_any_upstream_call(
    gateway, model, parameters
):
    """A function's ``parameters`` is a JSON schema, an object: anything else was sent on as it came (a 503 after
    three attempts when the provider failed on it, or, to Gemini, the tool without its parameters)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    response = post(gateway, chat(model=model, tools=tools))
    assert_openai_error(response, 400, param="tools[0].function.parameters", code="invalid_type")
    assert_rejected_row(gateway, response, "invalid_type")
    assert gateway.upstream.requests_served() == 0


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
def test_a_tool_choice_naming_a_tool_not_given_is_a_400_before_any_upstream_call(gateway, model):
    """Forcing a call of a function the request does not define cannot be met: it went upstream (the model called
    a tool the client had not declared, or the provider refused it after the call); it is refused as OpenAI does."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    choice = {"type": "function", "function": {"name": "get_time"}}
    response = post(gateway, chat(model=model, tools=tools, tool_choice=choice))
    error = assert_openai_error(response, 400, param="tool_choice", code="invalid_value")
    assert "get_time" in error["message"]
    assert_rejected_row(gateway, response, "invalid_value")
    assert gateway.upstream.requests_served() == 0
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert post(gateway, chat(model=model, tools=tools, tool_choice=named)).status_code == 200


@pytest.mark.parametrize("value", ["false", 0, 1])
def test_stream_options_include_usage_that_is_not_a_boolean_is_a_400(gateway, value):
    """``"false"`` was read as true, and the stream ended with the usage chunk the client had turned off."""
    response = post(gateway, chat(stream=True, stream_options={"include_usage": value}))
    assert_openai_error(response, 400, param="stream_options.include_usage", code="invalid_type")
    assert_rejected_row(gateway, response, "invalid_type")
    assert gateway.upstream.requests_served() == 0


WRONGLY_TYPED = [
    ({"user": 5}, "user", "invalid_type"),
    ({"prompt_cache_key": 5}, "prompt_cache_key", "invalid_type"),
    ({"prompt_cache_retention": 24}, "prompt_cache_retention", "invalid_type"),
    ({"prompt_cache_retention": "1h"}, "prompt_cache_retention", "invalid_value"),
    ({"prompt_cache_options": "30m"}, "prompt_cache_options", "invalid_type"),
    ({"prompt_cache_options": {"ttl": "1h"}}, "prompt_cache_options.ttl", "invalid_value"),
    ({"prompt_cache_options": {"ttl": 30}}, "prompt_cache_options.ttl", "invalid_type"),
    ({"prompt_cache_options": {"mode": "auto"}}, "prompt_cache_options.mode", "invalid_value"),
    ({"prompt_cache_options": {"retention": "24h"}}, "prompt_cache_options.retention", "unknown_parameter"),
    ({"safety_identifier": ["a"]}, "safety_identifier", "invalid_type"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls", "invalid_type"),
    ({"service_tier": 5}, "service_tier", "invalid_type"),
]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        *WRONGLY_TYPED,
        ({"functions": [{"name": 5}]}, "functions[0].name", "invalid_type"),
        ({"functions": [{"name": "f"}, {"parameters": {}}]}, "functions[1].name", "missing_required_parameter"),
        ({"functions": [{"name": "f", "parameters": "x"}]}, "functions[0].parameters", "invalid_type"),
        ({"functions": {"name": "f"}}, "functions", "invalid_type"),
    ],
)
def test_a_field_of_the_wrong_type_or_value_is_a_400_before_any_upstream_call(gateway, fields, param, code):
    """Each went upstream as it came (the fake upstream took or echoed it, ``functions[0].name: 5`` was a 502; OpenAI
    refuses it, after the call): refused here, naming it, with its rejected row."""
    response = post(gateway, chat(tools=[WEATHER_TOOL], **fields))
    assert_openai_error(response, 400, param=param, code=code)
    assert_rejected_row(gateway, response, code)
    assert gateway.upstream.requests_served() == 0


@pytest.mark.parametrize(("fields", "param", "code"), WRONGLY_TYPED)
def test_a_field_of_the_wrong_type_or_value_on_v1_responses_is_a_400_before_any_upstream_call(
    gateway, fields, param, code
):
    """The same fields on /v1/responses, ``parallel_tool_calls`` without tools too (it was echoed as true)."""
    response = httpx.post(
        gateway.url + "/v1/responses",
        json={"model": "gpt-test", "input": "hi", **fields},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    )
    assert_openai_error(response, 400, param=param, code=code)
    assert_rejected_row(gateway, response, code)
    assert gateway.upstream.requests_served() == 0


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
@pytest.mark.parametrize(
    ("fields", "responses_fields", "param", "responses_param"),
    [
        ({"reasoning_effort": ["high"]}, {"reasoning": {"effort": ["high"]}}, "reasoning_effort", "reasoning.effort"),
        ({"reasoning_effort": {"e": 1}}, {"reasoning": {"effort": 3}}, "reasoning_effort", "reasoning.effort"),
        ({"verbosity": ["low"]}, {"text": {"verbosity": {"level": "low"}}}, "verbosity", "text.verbosity"),
    ],
)
def test_a_reasoning_effort_or_verbosity_that_is_not_a_string_is_a_400_naming_it(
    gateway, model, fields, responses_fields, param, responses_param
):
    """A list or an object went on as it came: to an Anthropic model (whose adapter looks the effort up among its
    thinking budgets) a 500, to an OpenAI one the provider's refusal after the call. A 400 naming it, before any
    upstream call, on /v1/chat/completions and /v1/responses (there as the client wrote it)."""
    response = post(gateway, chat(model=model, **fields))
    assert_openai_error(response, 400, param=param, code="invalid_type")
    assert_rejected_row(gateway, response, "invalid_type")
    response = httpx.post(
        gateway.url + "/v1/responses",
        json={"model": model, "input": "hi", **responses_fields},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    )
    assert_openai_error(response, 400, param=responses_param, code="invalid_type")
    assert gateway.upstream.requests_served() == 0


@pytest.mark.parametrize("tier", ["auto", "default", "flex", "scale", "priority", "on_demand"])
def test_each_of_openais_service_tiers_is_accepted(gateway, tier):
    """OpenAI's tiers, and another server's (Groq's on_demand): the value is the upstream's to judge."""
    assert (
        post(gateway, chat(service_tier=tier, user="u1", prompt_cache_key="k", parallel_tool_calls=False)).status_code
        == 200
    )
