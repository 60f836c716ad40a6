"""OpenAI's prompt caching controls through llmhub (``prompt_cache_retention``, ``prompt_cache_options``,
``prompt_cache_breakpoint``): on /v1/chat/completions and /v1/responses, to an OpenAI-protocol model (``gpt-test``) and
an Anthropic-protocol one (``claude-test``), what the fake upstream receives read from its request log."""

from __future__ import annotations

import httpx
import pytest

from providers.models import ProviderKind
from tests.factories import ModelFactory, ProviderFactory

pytestmark = pytest.mark.django_db(transaction=True)


def raw(gateway, path: str, body: dict) -> httpx.Response:
    return httpx.post(gateway.url + path, json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_an_older_sdks_in_memory_retention_is_taken_and_sent_as_the_specs_in_memory(gateway, path):
    """openai SDKs before the rename sent ``in-memory``, which the enum check refused (9d83010): it is the spec's
    ``in_memory``, sent so."""
    body = {"model": "gpt-test", "prompt_cache_retention": "in-memory"}
    if path == "/v1/responses":
        body["input"] = "hi [[reply=ok]]"
    else:
        body["messages"] = [{"role": "user", "content": "hi [[reply=ok]]"}]
    reply = raw(gateway, path, body)
    assert reply.status_code == 200, reply.text
    assert gateway.upstream.requests[-1]["body"]["prompt_cache_retention"] == "in_memory"


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_cache_options_on_v1_responses_reach_an_openai_model(gateway, stream):
    """The Responses API's ``prompt_cache_options`` was taken and dropped unsaid: it is sent on in the chat completion
    (OpenAI's chat completions take it), as the client gave it; a Claude model is not sent it (its translation sends
    what Anthropic knows)."""
    client = gateway.client()
    options = {"ttl": "30m", "mode": "explicit"}
    for model in ("gpt-test", "claude-test"):
        fields = {"prompt_cache_options": options}
        if stream:
            with client.responses.create(model=model, input="hi [[reply=ok]]", stream=True, extra_body=fields) as got:
                assert [event.type for event in got][-1] == "response.completed"
        else:
            assert client.responses.create(model=model, input="hi [[reply=ok]]", extra_body=fields).output_text == "ok"
        sent = gateway.upstream.requests[-1]["body"]
        if model == "gpt-test":
            assert sent["prompt_cache_options"] == options
        else:
            assert "prompt_cache_options" not in sent


BREAKPOINT = {"mode": "explicit"}
IMAGE = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def test_a_breakpoint_on_a_responses_input_part_is_on_the_chat_part_it_becomes(gateway):
    """``prompt_cache_breakpoint`` on an input item's content part (the spec's ``InputTextContentParam``,
    ``InputImageContentParam``) was dropped with the rest of the part's fields: it is on the chat content part the
    part becomes, a developer message's too (kept as parts when one is marked, where unmarked ones are joined)."""
    response = gateway.client().responses.create(
        model="gpt-test",
        input=[
            {
                "role": "developer",
                "content": [{"type": "input_text", "text": "Be brief.", "prompt_cache_breakpoint": BREAKPOINT}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": IMAGE, "prompt_cache_breakpoint": BREAKPOINT},
                    {"type": "input_text", "text": "A long document.", "prompt_cache_breakpoint": BREAKPOINT},
                    {"type": "input_text", "text": "hi [[reply=ok]]"},
                ],
            },
        ],
        extra_body={"prompt_cache_options": {"mode": "explicit"}},
    )
    assert response.output_text == "ok"
    developer, user = gateway.upstream.requests[-1]["body"]["messages"]
    assert developer == {
        "role": "developer",
        "content": [{"type": "text", "text": "Be brief.", "prompt_cache_breakpoint": BREAKPOINT}],
    }
    assert [part.get("prompt_cache_breakpoint") for part in user["content"]] == [BREAKPOINT, BREAKPOINT, None]
    assert user["content"][0]["type"] == "image_url"


@pytest.mark.parametrize("breakpoint", [{"mode": "implicit"}, {}, "explicit", {"mode": "explicit", "ttl": "1h"}])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_breakpoint_not_of_the_specs_shape_is_a_400_naming_its_part(gateway, path, breakpoint):
    """Anything but ``{"mode": "explicit"}`` (the spec's ``PromptCacheBreakpointParam``) is refused before any upstream
    call, naming the part's ``prompt_cache_breakpoint`` (``.mode`` when that is what is wrong)."""
    if path == "/v1/responses":
        part = {"type": "input_text", "text": "hi", "prompt_cache_breakpoint": breakpoint}
        body = {"model": "gpt-test", "input": [{"role": "user", "content": [part]}]}
        where = "input[0].content[0].prompt_cache_breakpoint"
    else:
        part = {"type": "text", "text": "hi", "prompt_cache_breakpoint": breakpoint}
        body = {"model": "gpt-test", "messages": [{"role": "user", "content": [part]}]}
        where = "messages[0].content[0].prompt_cache_breakpoint"
    reply = raw(gateway, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] in (where, where + ".mode", where + ".ttl"), error
    assert gateway.upstream.requests_served() == 0


def marked_text(text: str) -> dict:
    return {"type": "text", "text": text, "prompt_cache_breakpoint": BREAKPOINT}


def cache_controls(sent: dict) -> list:
    """Each block's ``cache_control`` in the order Anthropic reads them (system, then the turns), None where none."""
    system = sent.get("system")
    blocks = system if isinstance(system, list) else []
    return [block.get("cache_control") for block in blocks] + [
        block.get("cache_control") for turn in sent["messages"] for block in turn["content"]
    ]


def test_breakpoints_reach_claude_as_its_cache_control_the_last_four_with_a_one_hour_ttl(gateway):
    """A breakpoint on a chat part was dropped by Claude's translation (its own ``cache_control`` alone went through):
    each is ``cache_control`` on the block the part becomes, ``ephemeral`` with Anthropic's 1-hour TTL (the spec's
    30 minutes is a minimum lifetime, which Anthropic's 5-minute default would not keep); past Anthropic's four, the
    last four are written, as OpenAI writes the latest, and the earlier ones are left unmarked."""
    reply = gateway.client().chat.completions.create(
        model="claude-test",
        messages=[
            {"role": "system", "content": [marked_text("Be brief."), {"type": "text", "text": "Answer in English."}]},
            {"role": "user", "content": [marked_text("one"), marked_text("two"), marked_text("three")]},
            {"role": "assistant", "content": [marked_text("noted")]},
            {"role": "user", "content": [{"type": "text", "text": "hi [[reply=ok]]"}]},
        ],
        extra_body={"prompt_cache_options": {"ttl": "30m", "mode": "explicit"}},
    )
    assert reply.choices[0].message.content == "ok"
    sent = gateway.upstream.requests[-1]["body"]
    hour = {"type": "ephemeral", "ttl": "1h"}
    assert sent["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in English."}]
    assert cache_controls(sent) == [None, None, hour, hour, hour, hour, None]
    assert "prompt_cache_options" not in sent


def test_claudes_own_cache_control_past_four_is_anthropics_400(gateway):
    """The fake upstream's Anthropic route refuses a fifth ``cache_control`` block as Anthropic does (its words), so a
    translation writing more than four would be seen; a client's own five (passed through as given) get that 400."""
    parts = [{"type": "text", "text": f"part {n}", "cache_control": {"type": "ephemeral"}} for n in range(5)]
    reply = raw(
        gateway, "/v1/chat/completions", {"model": "claude-test", "messages": [{"role": "user", "content": parts}]}
    )
    assert reply.status_code == 400, reply.text
    assert "A maximum of 4 blocks with cache_control may be provided. Found 5." in reply.json()["error"]["message"]


@pytest.fixture
def other_providers(gateway):
    """Gemini, Cohere, Ollama and Mistral deployments on the fake upstream, each answering ``<kind>-cache-test``."""
    base = gateway.upstream.base_url
    for kind, url, upstream_id in [
        (ProviderKind.GEMINI, base, "gemini-2.0-flash"),
        (ProviderKind.COHERE, base + "/cohere", "command-a-03-2025"),
        (ProviderKind.OLLAMA, base + "/ollama/v1", "llama3.2"),
        (ProviderKind.MISTRAL, base + "/mistral/v1", "mistral-small-latest"),
    ]:
        provider = ProviderFactory(name=f"fake-{kind}", kind=kind, base_url=url)
        ModelFactory(name=f"{kind}-cache-test", provider=provider, upstream_id=upstream_id)
    return gateway


def sent_anywhere(value, name: str) -> bool:
    if isinstance(value, dict):
        return name in value or any(sent_anywhere(item, name) for item in value.values())
    return isinstance(value, list) and any(sent_anywhere(item, name) for item in value)


@pytest.mark.parametrize("kind", ["gemini", "cohere", "ollama", "mistral"])
def test_a_provider_without_explicit_caching_is_sent_no_hint_and_answers(other_providers, kind):
    """Gemini, Cohere, Ollama and Mistral cache implicitly or not at all: a breakpoint or the cache options, which
    cannot be honoured there and change no answer, are dropped (Mistral refused them with its 422, a 400)."""
    reply = other_providers.client().chat.completions.create(
        model=f"{kind}-cache-test",
        messages=[
            {"role": "system", "content": [marked_text("Be brief.")]},
            {"role": "user", "content": [marked_text("A long document."), {"type": "text", "text": "hi [[reply=ok]]"}]},
        ],
        extra_body={"prompt_cache_options": {"ttl": "30m", "mode": "explicit"}},
    )
    assert reply.choices[0].message.content == "ok"
    sent = other_providers.upstream.requests[-1]["body"]
    assert not sent_anywhere(sent, "prompt_cache_breakpoint") and not sent_anywhere(sent, "prompt_cache_options")


def test_claudes_own_one_hour_cache_control_after_a_five_minute_one_is_anthropics_400(gateway):
    """The fake upstream's Anthropic route took any order of cache TTLs, though Anthropic refuses a 1-hour
    ``cache_control`` after a 5-minute one (tools, system, then turns: longer-lived entries first), so a translation
    writing that order would pass every test and fail on Claude; a client's own such order (passed through as given)
    gets Anthropic's 400 and words; the other order is answered."""
    five, hour = {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}
    for first, second, status in [(five, hour, 400), (hour, five, 200), ({**five, "ttl": "5m"}, hour, 400)]:
        parts = [
            {"type": "text", "text": "A long document.", "cache_control": first},
            {"type": "text", "text": "Another.", "cache_control": second},
            {"type": "text", "text": "hi [[reply=ok]]"},
        ]
        reply = raw(
            gateway, "/v1/chat/completions", {"model": "claude-test", "messages": [{"role": "user", "content": parts}]}
        )
        assert reply.status_code == status, reply.text
    reply = raw(
        gateway,
        "/v1/chat/completions",
        {
            "model": "claude-test",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": five}] * 2}],
        },
    )
    assert reply.status_code == 200, reply.text
    misordered = [
        {"type": "text", "text": "A long document.", "cache_control": five},
        {"type": "text", "text": "Another.", "cache_control": hour},
    ]
    reply = raw(
        gateway, "/v1/chat/completions", {"model": "claude-test", "messages": [{"role": "user", "content": misordered}]}
    )
    assert (
        "messages.0.content.1.cache_control.ttl: a ttl='1h' cache_control block must not come after a ttl='5m' "
        "cache_control block. Note that blocks are processed in the following order: `tools`, `system`, `messages`."
    ) in reply.json()["error"]["message"]


def test_a_breakpoint_after_the_clients_own_five_minute_cache_control_is_of_five_minutes_on_claude(gateway):
    """A breakpoint became Anthropic's 1-hour ``cache_control`` wherever it was, and one after the client's own of the
    default 5 minutes got Anthropic's 400 (a 1-hour entry may not follow a 5-minute one): the client's own stands, and
    each breakpoint after it (a tool result's part too) is of the 5-minute TTL; one before it keeps its hour."""
    five = {"type": "ephemeral"}
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    reply = gateway.client().chat.completions.create(
        model="claude-test",
        messages=[
            {"role": "system", "content": [marked_text("Be brief.")]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "A long document.", "cache_control": five}, marked_text("one")],
            },
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": [marked_text("The result.")]},
            {"role": "user", "content": "hi [[reply=ok]]"},
        ],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    )
    assert reply.choices[0].message.content == "ok"
    sent = gateway.upstream.requests[-1]["body"]
    assert [block.get("cache_control") for block in sent["system"]] == [{"type": "ephemeral", "ttl": "1h"}]
    assert [block.get("cache_control") for block in sent["messages"][0]["content"]] == [five, five]
    (result,) = sent["messages"][2]["content"]
    assert [block.get("cache_control") for block in result["content"]] == [five]


def test_mistral_takes_prompt_cache_key(other_providers):
    """Mistral's chat completions take ``prompt_cache_key`` (its API reference's ``ChatCompletionRequest``; its prompt
    caching guide: requests sharing one are routed to its cache), which the fake upstream's Mistral route refused
    with Mistral's 422 for a field it does not take, so a test of the key on Mistral could not pass: it is answered,
    the key sent as given."""
    reply = other_providers.client().chat.completions.create(
        model="mistral-cache-test",
        messages=[{"role": "user", "content": "hi [[reply=ok]]"}],
        extra_body={"prompt_cache_key": "tenant-7"},
    )
    assert reply.choices[0].message.content == "ok"
    assert other_providers.upstream.requests[-1]["body"]["prompt_cache_key"] == "tenant-7"


@pytest.mark.parametrize("kind", ["mistral", "ollama"])
def test_prompt_cache_retention_is_not_sent_to_mistral_or_ollama_and_the_key_to_mistral_only(other_providers, kind):
    """``prompt_cache_retention`` went up to Mistral, which has no such field and refused the whole request with its
    422 (a 400 to the client, for a hint that changes no answer), and to Ollama, which ignores it, as it does
    ``prompt_cache_key``: neither caches on a retention asked, so it is left out and the request answered; Mistral
    is sent the key, which routes requests sharing it to its cache, and Ollama is not."""
    reply = other_providers.client().chat.completions.create(
        model=f"{kind}-cache-test",
        messages=[{"role": "user", "content": "hi [[reply=ok]]"}],
        extra_body={"prompt_cache_key": "tenant-7", "prompt_cache_retention": "24h"},
    )
    assert reply.choices[0].message.content == "ok"
    sent = other_providers.upstream.requests[-1]["body"]
    assert "prompt_cache_retention" not in sent
    assert sent.get("prompt_cache_key") == ("tenant-7" if kind == "mistral" else None)


def test_a_breakpoint_on_a_responses_tool_outputs_part_is_on_the_chat_tool_messages_part(gateway):
    """A ``function_call_output``'s ``output`` may be a list of input parts, each with its ``prompt_cache_breakpoint``
    (the spec's ``FunctionCallOutputItemParam``), and a chat tool message's text part takes one: the parts were joined
    into a string and the breakpoint dropped, so a client marking the end of its prefix after a long tool result had
    none written; a marked output stays the tool message's parts (an unmarked one is joined, as before), and reaches
    Claude as ``cache_control`` on the tool result's block."""
    output = [
        {"type": "input_text", "text": "A long "},
        {"type": "input_text", "text": "result.", "prompt_cache_breakpoint": BREAKPOINT},
    ]
    for model in ("gpt-test", "claude-test"):
        response = gateway.client().responses.create(
            model=model,
            input=[
                {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": output},
                {"type": "function_call", "call_id": "call_2", "name": "lookup", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_2", "output": [output[0]]},
                {"role": "user", "content": "hi [[reply=ok]]"},
            ],
            tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        )
        assert response.output_text == "ok"
        sent = gateway.upstream.requests[-1]["body"]
        if model == "gpt-test":
            marked, unmarked = [message for message in sent["messages"] if message["role"] == "tool"]
            assert marked["content"] == [
                {"type": "text", "text": "A long "},
                {"type": "text", "text": "result.", "prompt_cache_breakpoint": BREAKPOINT},
            ]
            assert unmarked["content"] == "A long "
        else:
            marked, unmarked = [block for turn in sent["messages"] for block in turn["content"]][1::2]
            assert [block.get("cache_control") for block in marked["content"]] == [
                None,
                {"type": "ephemeral", "ttl": "1h"},
            ]
            assert unmarked["content"] == "A long "


@pytest.mark.parametrize("kind", ["gemini", "cohere", "ollama", "mistral"])
def test_a_marked_responses_tool_output_reaches_a_provider_without_explicit_caching_unmarked(other_providers, kind):
    """A marked tool output, now the chat tool message's parts, is answered by the providers that cache implicitly or
    not at all, sent no breakpoint."""
    output = [{"type": "input_text", "text": "A long result.", "prompt_cache_breakpoint": BREAKPOINT}]
    response = other_providers.client().responses.create(
        model=f"{kind}-cache-test",
        input=[
            {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": output},
            {"role": "user", "content": "hi [[reply=ok]]"},
        ],
        tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
    )
    assert response.output_text == "ok"
    sent = other_providers.upstream.requests[-1]["body"]
    assert not sent_anywhere(sent, "prompt_cache_breakpoint")
