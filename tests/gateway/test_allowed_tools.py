"""Chat completions' ``tool_choice: {"type": "allowed_tools", ...}``: OpenAI's way to let the model call only some of
a long tool list for one turn. OpenAI's own API takes it as it is; every other provider gets the allowed tools alone,
with the mode as its choice (``providers.adapters.common.allowed_tools_narrowed``). The fake model calls the first
tool it may: here the second one defined, so a reply that calls it shows the choice held."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest

from llmhub.testing.openapi import validate_openai_schema
from providers.models import ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_bad_input import assert_openai_error
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PATCH = {"type": "custom", "custom": {"name": "apply_patch"}}


def allowed(mode: str, *names: str) -> dict:
    return {
        "type": "allowed_tools",
        "allowed_tools": {"mode": mode, "tools": [{"type": "function", "function": {"name": n}} for n in names]},
    }


@pytest.fixture
def models(gateway):
    """Besides ``gpt-test`` (an OpenAI-compatible server) and ``claude-test``: OpenAI's own API, vLLM and Ollama."""
    base = gateway.upstream.base_url
    openai_itself = ProviderFactory(name="openai-itself", kind=ProviderKind.OPENAI, base_url=base + "/v1")
    vllm = ProviderFactory(name="vllm-server", kind=ProviderKind.VLLM, base_url=base + "/v1")
    ollama = ProviderFactory(name="fake-ollama", kind=ProviderKind.OLLAMA, base_url=base + "/ollama/v1")
    ModelFactory(name="openai-test", provider=openai_itself, upstream_id="fake-gpt-4o-mini")
    ModelFactory(name="vllm-test", provider=vllm, upstream_id="fake-gpt-4o-mini")
    ModelFactory(name="llama-test", provider=ollama, upstream_id="llama3.2", input_per_mtok=Decimal(0))
    return gateway


def sent_tool_names(body: dict) -> list[str]:
    return [tool["function"]["name"] if "function" in tool else tool["name"] for tool in body["tools"]]


@pytest.mark.parametrize("model", ["openai-test", "vllm-test", "gpt-test", "claude-test"])
@pytest.mark.parametrize("mode", ["auto", "required"])
def test_the_model_calls_only_an_allowed_tool_on_every_provider(models, model, mode):
    """Until 6 December the choice went on as it came: vLLM and most OpenAI-compatible servers refuse a
    tool_choice of that type (a 400 after the call, or the whole list offered), and Claude's translation refused it
    with a 400."""
    choice = allowed(mode, "get_time")
    raw = models.client().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Oslo"}], tools=[WEATHER, TIME], tool_choice=choice
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateChatCompletionResponse")
    [call] = raw.parse().choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"city": "Oslo"})
    sent = models.upstream.requests[-1]["body"]
    if model == "openai-test":
        assert sent["tool_choice"] == choice and sent_tool_names(sent) == ["get_weather", "get_time"]
    elif model == "claude-test":
        assert sent_tool_names(sent) == ["get_time"]
        assert sent["tool_choice"]["type"] == {"auto": "auto", "required": "any"}[mode]
    else:
        assert sent["tool_choice"] == mode and sent_tool_names(sent) == ["get_time"]


@pytest.mark.parametrize("model", ["vllm-test", "claude-test"])
def test_a_stream_with_allowed_tools_calls_only_an_allowed_tool(models, model):
    chunks = list(
        models.client().chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Oslo"}],
            tools=[WEATHER, TIME],
            tool_choice=allowed("required", "get_time"),
            stream=True,
        )
    )
    names = [
        call.function.name
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or ()
        if call.function and call.function.name
    ]
    assert names == ["get_time"]
    assert sent_tool_names(models.upstream.requests[-1]["body"]) == ["get_time"]


def test_a_custom_tool_may_be_the_one_allowed(models):
    choice = {
        "type": "allowed_tools",
        "allowed_tools": {"mode": "required", "tools": [{"type": "custom", "custom": {"name": "apply_patch"}}]},
    }
    models.client().chat.completions.create(
        model="vllm-test", messages=[{"role": "user", "content": "Fix it"}], tools=[WEATHER, PATCH], tool_choice=choice
    )
    sent = models.upstream.requests[-1]["body"]
    assert sent["tools"] == [PATCH] and sent["tool_choice"] == "required"


def test_ollama_takes_allowed_tools_in_mode_auto_and_refuses_required(models):
    """Ollama cannot be made to call a tool: ``auto`` over the allowed tools it can keep, ``required`` it cannot."""
    reply = models.client().chat.completions.create(
        model="llama-test",
        messages=[{"role": "user", "content": "Oslo"}],
        tools=[WEATHER, TIME],
        tool_choice=allowed("auto", "get_time"),
    )
    assert [call.function.name for call in reply.choices[0].message.tool_calls] == ["get_time"]
    sent = models.upstream.requests[-1]["body"]
    assert sent_tool_names(sent) == ["get_time"] and "tool_choice" not in sent
    with pytest.raises(openai.BadRequestError) as refused:
        models.client().chat.completions.create(
            model="llama-test",
            messages=[{"role": "user", "content": "Oslo"}],
            tools=[WEATHER, TIME],
            tool_choice=allowed("required", "get_time"),
        )
    assert refused.value.body["param"] == "tool_choice"


@pytest.mark.parametrize(
    ("allowed_tools", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "get_time"}}]}, "tool_choice.allowed_tools.mode"),
        (
            {"mode": "none", "tools": [{"type": "function", "function": {"name": "get_time"}}]},
            "tool_choice.allowed_tools.mode",
        ),
        ({"mode": "auto"}, "tool_choice.allowed_tools.tools"),
        ({"mode": "auto", "tools": []}, "tool_choice.allowed_tools.tools"),
        ({"mode": "auto", "tools": ["get_time"]}, "tool_choice.allowed_tools.tools[0]"),
        ({"mode": "auto", "tools": [{"type": "web_search"}]}, "tool_choice.allowed_tools.tools[0]"),
        ({"mode": "auto", "tools": [{"type": "function"}]}, "tool_choice.allowed_tools.tools[0].function.name"),
        (
            {"mode": "auto", "tools": [{"type": "function", "function": {"name": "get_date"}}]},
            "tool_choice.allowed_tools.tools[0]",
        ),
        (
            {"mode": "required", "tools": [{"type": "custom", "custom": {"name": "get_time"}}]},
            "tool_choice.allowed_tools.tools[0]",
        ),
    ],
)
@pytest.mark.parametrize("model", ["vllm-test", "openai-test"])
def test_allowed_tools_of_a_wrong_shape_or_not_among_the_tools_are_a_400_before_any_call(
    models, model, allowed_tools, param
):
    """OpenAI refuses them; sent on, the narrowing would have sent no tool at all, or the upstream its own 400."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "allowed_tools", "allowed_tools": allowed_tools},
    }
    response = httpx.post(
        models.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {models.key}"}, timeout=20
    )
    assert_openai_error(response, 400, param=param)
    assert models.upstream.requests_served() == 0
    assert wait_for_record(response.headers["x-request-id"]).status == "rejected"
