"""An Ollama provider behind a live llmhub, used with the official openai SDK. Ollama serves a subset of
OpenAI's protocol and ignores the fields it does not read; the fake's /ollama routes do the same."""

from __future__ import annotations

import json
from decimal import Decimal

import openai
import pytest

from llmhub.testing.openapi import validate_openai_schema
from providers.models import ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.conftest import REFUSED_TURN, REFUSED_TURN_TEXTS, reply_text
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ollama(gateway):
    provider = ProviderFactory(
        name="fake-ollama", kind=ProviderKind.OLLAMA, base_url=gateway.upstream.base_url + "/ollama/v1"
    )
    ModelFactory(
        name="llama-test",
        provider=provider,
        upstream_id="llama3.2",
        input_per_mtok=Decimal(0),
        output_per_mtok=Decimal(0),
    )
    return gateway


def test_a_completion_and_a_stream_through_ollama(ollama):
    raw = ollama.client().chat.completions.with_raw_response.create(
        model="llama-test", messages=[{"role": "user", "content": "[[words=3]]"}]
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateChatCompletionResponse")
    assert raw.parse().choices[0].message.content == "lorem ipsum dolor"
    assert wait_for_record(raw.headers["x-request-id"]).completion_tokens == 3

    chunks = list(
        ollama.client().chat.completions.create(
            model="llama-test",
            messages=[{"role": "user", "content": "[[words=3]]"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "lorem ipsum dolor"
    assert chunks[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_assistant_turns_refusal_part_reaches_ollama_as_its_text(ollama, stream):
    """OpenAI's spec types an assistant message's parts as text or ``refusal``; Ollama's OpenAI compatibility reads
    text and image_url parts alone and refuses another (its 400 ``invalid message format``, naming nothing), so a
    conversation in which the model had refused could not go on there. The refusal's text is a text part of the turn,
    in its place among the others, as Claude's, Cohere's and Gemini's translations send it on."""
    messages = REFUSED_TURN
    response = ollama.client().chat.completions.create(model="llama-test", messages=messages, stream=stream)
    assert reply_text(response, stream) == "Echo: Why not?"
    sent = ollama.upstream.requests[-1]["body"]["messages"]
    parts = [{"type": "text", "text": text} for text in REFUSED_TURN_TEXTS]
    assert sent[1] == {"role": "assistant", "content": parts}


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:text/html;base64,PGI+aGk8L2I+", "invalid_image_format"),
        ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "invalid_image_format"),
        ("data:IMAGE/PNG;base64,iVBORw0KGgo=", "invalid_image_format"),
        ("https://example.com/cat.png", "image_url_not_supported"),
    ],
    ids=["html", "gif", "upper-case", "remote"],
)
def test_an_image_ollama_cannot_take_is_a_400_naming_its_url_before_any_call(ollama, url, code):
    """Ollama decodes a base64 data URL of type image/jpeg, jpg, png or webp (as written) or of none, and fetches no
    URL (its decodeImageURL): another went up for its 400 ``invalid image input``, naming nothing, after the call."""
    image = {"type": "image_url", "image_url": {"url": url}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
    with pytest.raises(openai.BadRequestError) as caught:
        ollama.client().chat.completions.create(model="llama-test", messages=messages)
    assert (caught.value.body["param"], caught.value.body["code"]) == ("messages[0].content[1].image_url.url", code)
    assert ollama.upstream.requests_served("/ollama/v1/chat/completions") == 0


@pytest.mark.parametrize(
    "url",
    [
        "data:image/jpeg;base64,/9j/4AAQ",
        "data:image/jpg;base64,/9j/4AAQ",
        "data:image/png;base64,iVBORw0KGgo=",
        "data:image/webp;base64,UklGRg==",
        "data:;base64,iVBORw0KGgo=",
    ],
)
def test_an_image_ollama_decodes_goes_to_it_as_it_came(ollama, url):
    image = {"type": "image_url", "image_url": {"url": url}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "a screenshot:"}, image]},
    ]
    ollama.client().chat.completions.create(model="llama-test", messages=messages)
    sent = ollama.upstream.requests[-1]["body"]["messages"]
    assert sent[0]["content"][1] == sent[2]["content"][1] == image


@pytest.mark.parametrize("stream", [False, True])
def test_n_above_1_is_refused_rather_than_answered_with_one_choice(ollama, stream):
    # Ollama reads no `n`: it would answer one choice where the client asked for three, silently.
    with pytest.raises(openai.BadRequestError) as caught:
        response = ollama.client().chat.completions.create(
            model="llama-test", messages=[{"role": "user", "content": "hi"}], n=3, stream=stream
        )
        list(response) if stream else None
    assert (caught.value.body["param"], caught.value.body["code"]) == ("n", "unsupported_value")
    assert ollama.upstream.requests_served("/ollama/v1/chat/completions") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_max_completion_tokens_limits_an_ollama_reply(ollama, stream):
    # Ollama reads `max_tokens` only (its `num_predict`) and ignores `max_completion_tokens`: sent as the client
    # spelt it, the reply would run on past the limit the key's budget was reserved for.
    response = ollama.client().chat.completions.with_raw_response.create(
        model="llama-test",
        messages=[{"role": "user", "content": "[[words=12]]"}],
        max_completion_tokens=3,
        stream=stream,
    )
    if stream:
        chunks = list(response.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    else:
        choice = response.parse().choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert (text, finish) == ("lorem ipsum dolor", "length")
    assert wait_for_record(response.headers["x-request-id"]).completion_tokens == 3


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_tool_choice_none_through_ollama_gets_an_answer_not_a_tool_call(ollama):
    # Ollama reads no tool_choice: given the tools, the model may call one whatever the client said.
    completion = ollama.client().chat.completions.create(
        model="llama-test", messages=[{"role": "user", "content": "Paris?"}], tools=[WEATHER], tool_choice="none"
    )
    choice = completion.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == ("Echo: Paris?", None, "stop")


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"]
)
def test_a_tool_choice_ollama_cannot_enforce_is_refused(ollama, tool_choice):
    with pytest.raises(openai.BadRequestError) as caught:
        ollama.client().chat.completions.create(
            model="llama-test", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice=tool_choice
        )
    assert (caught.value.body["param"], caught.value.body["code"]) == ("tool_choice", "unsupported_value")
    assert ollama.upstream.requests_served("/ollama/v1/chat/completions") == 0


def _calls(client, *, parallel: bool | None, stream: bool) -> list:
    """The tool calls of a reply that asks for three at once (``[[tool_calls=3]]``), with the SDK's stream
    helper putting a stream's pieces back together as a client's does."""
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    request = {
        "model": "llama-test",
        "messages": [{"role": "user", "content": "Paris [[tool_calls=3]]"}],
        "tools": [WEATHER],
        **extra,
    }
    if not stream:
        completion = client.chat.completions.create(**request)
        validate_openai_schema(completion.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    else:
        with client.chat.completions.stream(**request) as events:
            for event in events:
                if event.type == "chunk":
                    validate_openai_schema(
                        event.chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse"
                    )
            completion = events.get_final_completion()
    assert completion.choices[0].finish_reason == "tool_calls"
    return completion.choices[0].message.tool_calls


@pytest.mark.parametrize("stream", [False, True])
def test_no_parallel_tool_calls_through_ollama_gets_one_call_a_turn(ollama, stream):
    # Ollama reads no parallel_tool_calls: a model may ask for several calls at once, and a client that said
    # false runs one a turn. It gets the first; without the flag, or with true, every call comes back.
    [call] = _calls(ollama.client(), parallel=False, stream=stream)
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert len(_calls(ollama.client(), parallel=None, stream=stream)) == 3
    assert len({c.id for c in _calls(ollama.client(), parallel=True, stream=stream)}) == 3
