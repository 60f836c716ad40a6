"""The one token estimator (``providers.tokens``): what admission reserves for a prompt and what settlement
charges when the provider counted nothing come from the same walk of the body. Pure functions."""

from __future__ import annotations

import json
import math

import pytest

from billing.models import Operation
from providers.tokens import (
    IMAGE_TOKENS,
    IMAGE_TOKENS_MOST,
    prompt_tokens,
    text_tokens,
    upstream_searches_every_request,
)

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
FUNCTION = {"name": "weather", "description": "Weather in a city", "parameters": {"type": "object"}}
ARGUMENTS = '{"city": "Paris"}'
RESULT = {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "4"}]}

BODIES = {
    "plain chat": (Operation.CHAT, {"messages": [{"role": "user", "content": "Hello there, how are you?"}]}),
    "chat with tools and a tool call": (
        Operation.CHAT,
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}, IMAGE]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "18 degrees and sunny"},
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        },
    ),
    "messages with system blocks, tool use and thinking": (
        Operation.MESSAGES,
        {
            "system": [{"type": "text", "text": "You are terse."}],
            "messages": [
                {"role": "user", "content": "What is 2 + 2?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Simple arithmetic."},
                        {"type": "tool_use", "id": "t1", "name": "calc", "input": {"expr": "2+2"}},
                    ],
                },
                {"role": "user", "content": [RESULT]},
            ],
        },
    ),
    "chat with the legacy functions and a function call": (
        Operation.CHAT,
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": ARGUMENTS}},
                {"role": "function", "name": "weather", "content": "18 degrees and sunny"},
            ],
            "functions": [FUNCTION],
        },
    ),
    "chat with a reasoning model's earlier turn": (
        Operation.CHAT,
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Sunny.", "reasoning_content": "A forecast, then a short answer."},
                {"role": "user", "content": "And Rome?"},
            ],
        },
    ),
    "embeddings text": (Operation.EMBEDDINGS, {"input": ["first document", "a second, longer document"]}),
}


@pytest.mark.parametrize("name", BODIES)
def test_the_reservation_bound_is_never_below_the_settlement_estimate(name):
    operation, body = BODIES[name]
    estimate = prompt_tokens(body, operation=operation)
    assert estimate > 0
    assert prompt_tokens(body, operation=operation, upper_bound=True) > estimate


def test_text_is_four_characters_a_token_estimated_and_two_at_most():
    body = {"messages": [{"role": "user", "content": "x" * 400}]}
    assert prompt_tokens(body, operation=Operation.CHAT) == 100 + 3
    assert prompt_tokens(body, operation=Operation.CHAT, upper_bound=True) == 200 + 8 + 16
    assert text_tokens("x" * 401) == 101
    assert text_tokens("") == 0


def bound_of_text(text: str) -> int:
    """A one-message chat's bound less its framing and overhead: its text's."""
    return (
        prompt_tokens({"messages": [{"role": "user", "content": text}]}, operation=Operation.CHAT, upper_bound=True)
        - 24
    )


def test_text_of_other_scripts_is_bounded_by_its_utf8_bytes_and_ascii_by_half_its_characters():
    """A byte-level BPE (OpenAI's cl100k and o200k, Llama 3's, Qwen's) makes at most a token of each UTF-8 byte: one or
    two of a common CJK character in cl100k, three of a rare one, up to three of an emoji. At two characters a token
    a CJK prompt was reserved at half a token a character, and parallel requests of a key spent past its budget.
    ASCII text is bounded as before."""
    assert bound_of_text("x" * 400) == 200
    assert bound_of_text("漢" * 100) == 300
    assert bound_of_text("🙂" * 10) == 40
    assert bound_of_text("Привет") == 12
    assert bound_of_text("漢字 and kana かな") == 4 * 3 + len(" and kana ") // 2
    assert bound_of_text(chr(0xD800)) == 3  # a lone surrogate, which JSON may carry, at the bytes it is sent as


CJK = "東京の天気" * 20  # 100 characters, 300 UTF-8 bytes


def bodies_holding(text: str) -> dict[str, tuple[str, dict]]:
    """A body of each operation with ``text`` in each place the walk reads."""
    return {
        "chat content": (Operation.CHAT, {"messages": [{"role": "user", "content": text}]}),
        "chat text part": (
            Operation.CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]},
        ),
        "tool call arguments": (
            Operation.CHAT,
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": text}}]}]},
        ),
        "reasoning sent back": (Operation.CHAT, {"messages": [{"role": "assistant", "reasoning_content": text}]}),
        "tool definition": (Operation.CHAT, {"messages": [], "tools": [{"function": {"description": text}}]}),
        "system": (Operation.MESSAGES, {"system": text, "messages": []}),
        "thinking": (
            Operation.MESSAGES,
            {"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": text}]}]},
        ),
        "tool use input": (
            Operation.MESSAGES,
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": {"q": text}}]}]},
        ),
        "tool result": (
            Operation.MESSAGES,
            {"messages": [{"role": "user", "content": [{**RESULT, "content": [{"type": "text", "text": text}]}]}]},
        ),
        "completion prompt": (Operation.COMPLETIONS, {"prompt": [text]}),
        "completion suffix": (Operation.COMPLETIONS, {"prompt": "", "suffix": text}),
    }


@pytest.mark.parametrize("place", bodies_holding(""))
def test_cjk_text_anywhere_in_a_body_is_bounded_by_its_bytes(place):
    """What a text of 100 CJK characters adds to the bound over as many ASCII ones: its 300 bytes, not 50 tokens."""
    operation, cjk = bodies_holding(CJK)[place]
    ascii_body = bodies_holding("x" * len(CJK))[place][1]
    bound = prompt_tokens(cjk, operation=operation, upper_bound=True)
    assert bound - prompt_tokens(ascii_body, operation=operation, upper_bound=True) == 300 - 50


def test_text_of_other_scripts_is_estimated_at_about_what_tokenizers_bill_for_it():
    """Charged when the provider counted nothing (a stream cut short): a CJK character is about a token in o200k,
    Qwen's and Llama 3's tokenizers (one or two in cl100k), a Cyrillic letter about half one. At four characters a
    token a CJK reply was charged a quarter of what the provider billed. ASCII text is estimated as before."""
    assert text_tokens("x" * 401) == 101
    assert text_tokens("漢" * 100) == 100
    assert text_tokens("Привет мир") == math.ceil(9 / 2 + 1 / 4)
    assert text_tokens("🙂" * 10) == 15
    assert text_tokens("漢字 and kana かな") == math.ceil(4 + len(" and kana ") / 4)
    chat = {"messages": [{"role": "user", "content": "漢" * 100}]}
    assert prompt_tokens(chat, operation=Operation.CHAT) == 100 + 3
    assert prompt_tokens({"prompt": "漢" * 100}, operation=Operation.COMPLETIONS) == 100
    assert prompt_tokens({"input": "漢" * 100}, operation=Operation.EMBEDDINGS) == 100


@pytest.mark.parametrize("place", bodies_holding(""))
def test_cjk_text_anywhere_in_a_body_is_estimated_a_token_a_character(place):
    """What a text of 100 CJK characters adds to the estimate over as many ASCII ones: 100 tokens, not 25."""
    operation, cjk = bodies_holding(CJK)[place]
    ascii_body = bodies_holding("x" * len(CJK))[place][1]
    estimate = prompt_tokens(cjk, operation=operation)
    assert estimate - prompt_tokens(ascii_body, operation=operation) == 100 - 25


def test_every_part_of_a_messages_body_counts_once():
    """Anthropic's system blocks, a tool result's nested text and thinking are text; a block's JSON framing
    is not (the estimate used to see only plain message text, the bound the repr of the system blocks)."""
    operation, body = BODIES["messages with system blocks, tool use and thinking"]
    chars = len("You are terse.") + len("What is 2 + 2?") + len("Simple arithmetic.") + len('{"expr": "2+2"}') + 1
    assert prompt_tokens(body, operation=operation) == math.ceil(chars / 4) + 3 * 3


def test_a_legacy_function_call_and_the_functions_count_as_a_tool_call_and_the_tools_do():
    """The legacy ``functions`` (the definitions the model is given) and an assistant turn's ``function_call``
    (its arguments) are prompt as ``tools`` and ``tool_calls`` are: the estimate and the reservation's bound
    used to leave both out."""
    operation, body = BODIES["chat with the legacy functions and a function call"]
    chars = len("Weather in Paris?") + len(ARGUMENTS) + len("18 degrees and sunny") + len(json.dumps(FUNCTION))
    assert prompt_tokens(body, operation=operation) == math.ceil(chars / 4) + 3 * 3
    assert prompt_tokens(body, operation=operation, upper_bound=True) == math.ceil(chars / 2) + 8 * 3 + 16


def messages_calling(call: str, result: str) -> dict:
    """An earlier turn's call of a tool (a ``call`` block) and the turn that gives its result (a ``result``)."""
    found = {"type": result, "tool_use_id": "t1", "content": [{"type": "text", "text": "18 degrees and sunny"}]}
    return {
        "messages": [
            {"role": "user", "content": "Look it up"},
            {"role": "assistant", "content": [{"type": call, "id": "t1", "name": "find", "input": {"q": "Paris"}}]},
            {"role": "user", "content": [found]},
        ]
    }


@pytest.mark.parametrize(
    ("call", "result"), [("server_tool_use", "tool_result"), ("mcp_tool_use", "mcp_tool_result")], ids=["server", "mcp"]
)
@pytest.mark.parametrize("upper_bound", [False, True], ids=["estimate", "bound"])
def test_a_server_or_mcp_tool_call_and_its_result_count_as_a_tool_use_and_its_result_do(call, result, upper_bound):
    """A server tool's call (web search) or an MCP tool's call and result in an earlier turn reach the model as a
    tool_use and a tool_result do: the estimate and the reservation's bound used to leave them out."""
    counted = prompt_tokens(messages_calling(call, result), operation=Operation.MESSAGES, upper_bound=upper_bound)
    expected = messages_calling("tool_use", "tool_result")
    assert counted == prompt_tokens(expected, operation=Operation.MESSAGES, upper_bound=upper_bound)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_an_earlier_turns_reasoning_sent_back_counts_as_its_text(field):
    """A reasoning model's reasoning, sent back in an assistant turn (DeepSeek's thinking mode asks for it again in
    a tool-call round), reaches the model: the estimate and the reservation's bound used to leave it out."""
    operation, body = BODIES["chat with a reasoning model's earlier turn"]
    user, reply, follow_up = body["messages"]
    reply = {"role": "assistant", "content": "Sunny.", field: reply["reasoning_content"]}
    body = {"messages": [user, reply, follow_up]}
    chars = len("Weather in Paris?") + len("Sunny.") + len("A forecast, then a short answer.") + len("And Rome?")
    assert prompt_tokens(body, operation=operation) == math.ceil(chars / 4) + 3 * 3
    assert prompt_tokens(body, operation=operation, upper_bound=True) == math.ceil(chars / 2) + 8 * 3 + 16


def test_claudes_thinking_blocks_sent_back_count_as_their_text_once():
    """Claude's signed thinking, sent back in an assistant turn's ``thinking_blocks`` (a tool-use round), reaches the
    model: the estimate and the reservation's bound left it out. Its ``reasoning_content`` beside it is the same
    text, which Claude is not sent again: counted once."""
    thought = "A forecast, then a short answer."
    blocks = [
        {"type": "thinking", "thinking": thought, "signature": "c2ln"},
        {"type": "redacted_thinking", "data": "b3BhcXVl"},
    ]
    user, follow_up = {"role": "user", "content": "Weather in Paris?"}, {"role": "user", "content": "And Rome?"}
    chars = len("Weather in Paris?") + len("Sunny.") + len(thought) + len("And Rome?")
    for reply in (
        {"role": "assistant", "content": "Sunny.", "thinking_blocks": blocks},
        {"role": "assistant", "content": "Sunny.", "thinking_blocks": blocks, "reasoning_content": thought},
    ):
        body = {"messages": [user, reply, follow_up]}
        assert prompt_tokens(body, operation=Operation.CHAT) == math.ceil(chars / 4) + 3 * 3
        assert prompt_tokens(body, operation=Operation.CHAT, upper_bound=True) == math.ceil(chars / 2) + 8 * 3 + 16


def test_an_attachment_is_estimated_as_a_mid_sized_image_and_bounded_by_its_formula():
    """Settlement's estimate counts any attachment a mid-sized image; the bound counts a sound so too, and an image
    whose size does not read (``AAAA`` is no PNG) at the dearest formula's most, with no model known
    (``test_attachment_tokens.py``)."""
    body = {"messages": [{"role": "user", "content": [IMAGE, {"type": "input_audio"}, {"type": "text", "text": ""}]}]}
    assert prompt_tokens(body, operation=Operation.CHAT) == 2 * IMAGE_TOKENS + 3
    assert prompt_tokens(body, operation=Operation.CHAT, upper_bound=True) == IMAGE_TOKENS_MOST + IMAGE_TOKENS + 8 + 16


def test_token_arrays_count_exactly_and_text_inputs_by_the_estimator():
    assert prompt_tokens({"input": [1, 2, 3]}, operation=Operation.EMBEDDINGS, upper_bound=True) == 3
    assert prompt_tokens({"input": [[1, 2], [3]]}, operation=Operation.EMBEDDINGS) == 3
    assert prompt_tokens({"input": "abcdefgh"}, operation=Operation.EMBEDDINGS) == 2
    assert prompt_tokens({"input": ["abc", "abcde"]}, operation=Operation.EMBEDDINGS, upper_bound=True) == 8 + 2 * 4


def test_an_embeddings_text_is_bounded_by_its_utf8_bytes_and_its_inputs_special_tokens():
    """What a byte-level BPE counts at most (a token a byte), plus BOS/EOS or [CLS]/[SEP] an input. Two characters a
    token was no bound: an emoji is one character, four bytes, up to three tokens in tiktoken's cl100k."""
    assert prompt_tokens({"input": "abcdefgh"}, operation=Operation.EMBEDDINGS, upper_bound=True) == 8 + 4
    assert prompt_tokens({"input": "🙂" * 10}, operation=Operation.EMBEDDINGS, upper_bound=True) == 40 + 4
    assert prompt_tokens({"input": ["漢", chr(0xD800)]}, operation=Operation.EMBEDDINGS, upper_bound=True) == 6 + 8
    assert prompt_tokens({"input": "🙂" * 10}, operation=Operation.EMBEDDINGS) == 15  # the estimate: 1.5 an emoji
    assert prompt_tokens({"input": ["abc", "abcde"]}, operation=Operation.EMBEDDINGS) == 1 + 2


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": "not a list"},
        {"messages": [None, 3, {"content": [None, "text", {"type": "text", "text": None}]}]},
        {"messages": [{"role": "assistant", "tool_calls": [None, {"function": "weather"}]}]},
        {"tools": [{"callable": object()}]},
        {"input": None},
    ],
)
def test_a_shape_the_walk_does_not_know_counts_for_nothing_rather_than_failing(body):
    """Settlement runs in a ``finally``: an estimator that raised there would lose the ledger row."""
    for operation in (Operation.CHAT, Operation.MESSAGES, Operation.EMBEDDINGS):
        assert prompt_tokens(body, operation=operation) >= 0
        assert prompt_tokens(body, operation=operation, upper_bound=True) >= 0


def test_the_web_searches_a_request_may_run_are_its_web_search_tools_max_uses():
    from providers.tokens import WEB_SEARCHES_UNBOUNDED, web_searches_bound

    search = {"type": "web_search_20250305", "name": "web_search"}
    function = {"name": "get_weather", "input_schema": {"type": "object"}}
    assert web_searches_bound({"tools": [function]}) == 0
    assert web_searches_bound({}) == 0
    assert web_searches_bound({"tools": [function, {**search, "max_uses": 3}]}) == 3
    assert web_searches_bound({"tools": [search]}) == WEB_SEARCHES_UNBOUNDED
    assert web_searches_bound({"tools": [{**search, "max_uses": True}]}) == WEB_SEARCHES_UNBOUNDED
    # A chat completion's function named like one is no server tool.
    assert web_searches_bound({"tools": [{"type": "function", "function": {"name": "web_search"}}]}) == 0
    # A chat completion's web_search_options: OpenAI's search models search once before each answer.
    assert web_searches_bound({"web_search_options": {}, "tools": [function]}) == 1
    assert web_searches_bound({"web_search_options": None}) == 0
    # A model that searches on every request (OpenAI's search models): one for any request with messages, asked or
    # not, and not two with web_search_options; a text completion's prompt none.
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert web_searches_bound(chat, every_request=True) == 1
    assert web_searches_bound({**chat, "web_search_options": {}}, every_request=True) == 1
    assert web_searches_bound({"prompt": "hi"}, every_request=True) == 0
    # Each attempt that may answer (a stream resumed on failure) runs the chat's search again; a tool's max_uses is
    # reserved once, as only the attempt that ends a message runs Claude's searches.
    assert web_searches_bound({**chat, "web_search_options": {}}, answers=3) == 3
    assert web_searches_bound({**chat, "tools": [{**search, "max_uses": 2}]}, every_request=True, answers=2) == 4


@pytest.mark.parametrize(
    ("upstream_id", "searches"),
    [
        ("gpt-4o-search-preview", True),
        ("gpt-4o-mini-search-preview-2025-03-11", True),
        ("gpt-5-search-api", True),
        ("openai/gpt-4o-search-preview", True),  # behind a router (OpenRouter)
        ("gpt-4o", False),
        ("gpt-4o-mini", False),
        ("my-gpt-4o-search-preview", False),  # an Azure deployment's own name: its admin says so
    ],
)
def test_openai_search_models_are_told_by_their_upstream_id(upstream_id, searches):
    """The ids OpenAI documents for its search models, which search on every chat completion, asked or not."""
    assert upstream_searches_every_request(upstream_id) is searches
