"""A refusal of a function tool of the chat completion a request was translated into (the provider's: OpenAI refuses a
``strict`` function whose schema does not close its object, naming ``tools[N].function.parameters``) names the tool's
field as the client wrote it: on /v1/responses, whose function tools are flat, ``tools[N].parameters`` (the client's
index, where ``allowed_tools`` sent fewer tools); on /v1/messages ``tools.N.input_schema``. Until 7 December
/v1/responses answered with the chat completion's ``tools[N].function.parameters``, a field its client never wrote
(``tools[M]`` after ``allowed_tools``)."""

from __future__ import annotations

import pytest

from tests.gateway.test_bad_input import assert_openai_error
from tests.gateway.test_openai_image_types import post
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CLOSED = {**SCHEMA, "additionalProperties": False}


def function_tool(name: str, parameters: dict, *, strict: bool) -> dict:
    return {"type": "function", "name": name, "description": "A tool.", "parameters": parameters, "strict": strict}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_function_refused_by_the_provider_is_named_as_the_responses_tool(gateway, stream):
    tools = [function_tool("get_time", CLOSED, strict=True), function_tool("get_weather", SCHEMA, strict=True)]
    body = {"model": "gpt-test", "input": "Weather in Paris?", "tools": tools, "stream": stream}
    response = post(gateway, "/v1/responses", body)
    # Before: param tools[1].function.parameters.
    error = assert_openai_error(response, 400, param="tools[1].parameters", code="upstream_bad_request")
    assert "get_weather" in error["message"] and ".function" not in error["message"]
    record = wait_for_record(response.headers["x-request-id"])
    assert (record.status, record.operation) == ("invalid", "responses")


def test_a_function_sent_by_another_index_under_allowed_tools_is_named_by_the_clients(gateway):
    """``allowed_tools`` sends only the tools it allows: the refused function went up as ``tools[0]``, the client's
    ``tools[2]``."""
    tools = [
        function_tool("get_time", CLOSED, strict=True),
        function_tool("get_date", CLOSED, strict=False),
        function_tool("get_weather", SCHEMA, strict=True),
    ]
    choice = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_weather"}]}
    body = {"model": "gpt-test", "input": "Weather in Paris?", "tools": tools, "tool_choice": choice}
    response = post(gateway, "/v1/responses", body)
    # Before: param tools[2] (the nearest field the translation named), not the schema.
    assert_openai_error(response, 400, param="tools[2].parameters", code="upstream_bad_request")


def test_a_function_refused_by_the_provider_is_named_as_the_messages_tool(gateway):
    tools = [
        {"name": "get_time", "input_schema": CLOSED, "strict": True},
        {"name": "get_weather", "input_schema": SCHEMA, "strict": True},
    ]
    body = {
        "model": "gpt-test",
        "max_tokens": 50,
        "tools": tools,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    }
    response = post(gateway, "/v1/messages", body, **{"anthropic-version": "2023-06-01"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("`tools.1.input_schema`: Invalid schema for function 'get_weather'"), error
