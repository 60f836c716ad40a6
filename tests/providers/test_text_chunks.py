"""Text chunks read without a JSON decode (``providers.adapters.text_chunks``), through the OpenAI adapter's
chunk reader and the Anthropic adapter's event reader: whatever the upstream sends, each chunk is the dict
``json.loads`` would give, with the upstream's bytes, and the reader falls back to the decode for anything
but the next piece of plain text."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal
from types import SimpleNamespace
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmhub.testing.openapi import validate_openai_schema
from providers.adapters import anthropic as anthropic_adapter
from providers.adapters import openai as openai_adapter
from providers.adapters.anthropic import AnthropicAdapter
from providers.adapters.base import WireEvent
from providers.adapters.openai import OpenAIAdapter, _StreamState
from providers.adapters.openai_shape import StreamShape
from providers.adapters.sse import ServerSentEvent
from providers.adapters.text_chunks import TextChunks
from providers.exceptions import ProviderError
from providers.fields import Secret
from providers.types import ProviderConfig, ResolvedModel
from tests.providers.test_adapter_anthropic import make_config as make_anthropic_config
from tests.providers.test_adapter_openai import make_config, user

HEAD = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1764800000,"model":"up-1",'


def text_chunk(
    text: str,
    *,
    head: str = HEAD,
    tail: str = ',"logprobs":null,"finish_reason":null}]}',
    ascii_only: bool = True,
) -> bytes:
    """A text chunk as an OpenAI-compatible server sends it (``json.dumps`` of the text: escapes and all)."""
    encoded = json.dumps(text, ensure_ascii=ascii_only)
    return f'{head}"choices":[{{"index":0,"delta":{{"content":{encoded}}}{tail}'.encode()


def unescaped_chunk(text: str) -> bytes:
    """The text put between the quotes as it stands: JSON or not, depending on the text."""
    before, after = text_chunk("\x00").split(b'"\\u0000"')
    return before + b'"' + text.encode() + b'"' + after


class Decodes:
    count = 0


@contextlib.contextmanager
def decodes_counted(module):
    """``json.loads`` as ``module`` calls it, counted (only there: the in-process fake upstream decodes too)."""
    decodes = Decodes()

    def loads(*args, **kwargs):
        decodes.count += 1
        return json.loads(*args, **kwargs)

    with mock.patch.object(module, "json", SimpleNamespace(**{**vars(json), "loads": loads})):
        yield decodes


class Reader:
    """The adapter's chunk reader over one stream's events, counting the decodes it makes."""

    def __init__(self) -> None:
        config = ProviderConfig(
            id=1, name="up", kind="openai_compatible", base_url="http://127.0.0.1:9/v1", api_key=Secret("")
        )
        self.adapter = OpenAIAdapter(config)
        self.state = _StreamState()
        self.shape = StreamShape("up-1")
        self.decodes = 0

    def read(self, data: bytes):
        with decodes_counted(openai_adapter) as decodes:
            chunk = self.adapter._chunk(ServerSentEvent(None, data), self.state, self.shape)
        self.decodes += decodes.count
        return chunk


def assert_read_as_decoded(reader: Reader, data: bytes) -> None:
    """``reader`` gives for ``data`` what ``json.loads`` gives, with its bytes, or fails as the decode does."""
    try:
        expected = json.loads(data)
    except ValueError:
        with pytest.raises(ValueError):
            reader.read(data)
        return
    chunk = reader.read(data)
    assert chunk == expected
    assert chunk.raw == data


def test_text_chunks_after_the_first_are_read_without_a_decode():
    reader = Reader()
    words = [" one", " two", " three", " four", " café", " 🙂", "line\nbreak", ' a "quoted" word', "\\", "tab\t"]
    chunks = [reader.read(text_chunk(word)) for word in words]

    assert reader.decodes == 1  # the first, which the rest are read against
    for word, chunk in zip(words, chunks, strict=True):
        assert chunk == json.loads(text_chunk(word))
        assert chunk.raw == text_chunk(word)  # relayed byte for byte
        assert list(chunk) == list(json.loads(text_chunk(word)))  # in the upstream's order
        assert list(chunk["choices"][0]) == ["index", "delta", "logprobs", "finish_reason"]
    for word in words:  # as a server that does not escape what JSON lets through sends them
        data = text_chunk(word, ascii_only=False)
        assert reader.read(data) == json.loads(data)
    assert reader.decodes == 1


def test_a_chunk_shares_nothing_with_the_next():
    """Each chunk is the relay's to change: neither the one learned nor one read from it is the template."""
    reader = Reader()
    for change in (reader.read(text_chunk(" a")), reader.read(text_chunk(" b"))):
        change["choices"][0]["delta"]["content"] = "changed"
        change["choices"][0]["finish_reason"] = "changed"
        change["choices"][0]["index"] = 7
        change["id"] = "changed"
    assert reader.read(text_chunk(" c")) == json.loads(text_chunk(" c"))


def test_a_chunk_with_a_nested_value_is_not_learned():
    """Chunks read from a template would share its nested values: such a chunk is decoded each time."""
    reader = Reader()
    head = HEAD + '"extra":{"a":1},'
    reader.read(text_chunk(" a", head=head))
    second = reader.read(text_chunk(" b", head=head))
    second["extra"]["a"] = 2
    assert reader.read(text_chunk(" c", head=head)) == json.loads(text_chunk(" c", head=head))


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ('"delta":{"content":"X"}', '"delta":{"content":"X","tool_calls":[{"index":0,"type":"function"}]}'),
        (
            '"finish_reason":null}]',
            '"finish_reason":null},{"index":1,"delta":{},"logprobs":null,"finish_reason":null}]',
        ),
    ],
    ids=["a nested value beside the text", "a second choice"],
)
def test_a_chunk_with_more_than_its_text_to_copy_is_not_learned(before, after):
    """A list or dict beside the text (a tool call in the delta, a second choice) would be shared by every
    chunk read from the template: such chunks are decoded each time, and one changed leaves the next alone."""

    def chunk(text: str) -> bytes:
        data = text_chunk("X").replace(before.encode(), after.encode()).replace(b'"X"', json.dumps(text).encode())
        assert after.encode() in data.replace(json.dumps(text).encode(), b'"X"')
        return data

    reader = Reader()
    reader.read(chunk(" a"))
    second = reader.read(chunk(" b"))
    for choice in second["choices"]:
        choice["index"] = 9
        for call in choice["delta"].get("tool_calls", ()):
            call["index"] = 9
    assert reader.read(chunk(" c")) == json.loads(chunk(" c"))


def test_only_the_text_of_the_delta_is_taken_for_the_text():
    """A "content" key beside the choices, and the delta's own spelled with an escape: the bytes cannot tell
    which is the text, so nothing is learned (else the next chunk would be read with the wrong one)."""
    reader = Reader()
    head = HEAD + '"content":"x",'
    first = text_chunk("x", head=head).replace(b'"delta":{"content"', b'"delta":{"con\\u0074ent"')
    following = text_chunk("x", head=HEAD + '"content":"y",').replace(
        b'"delta":{"content"', b'"delta":{"con\\u0074ent"'
    )
    assert json.loads(first)["choices"][0]["delta"] == {"content": "x"}
    reader.read(first)
    assert reader.read(following) == json.loads(following)


@pytest.mark.parametrize(
    "data",
    [
        b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1764800000,"model":"up-1","choices":[{"index":0,'
        b'"delta":{"content":"a","tool_calls":[{"index":0,"function":{"arguments":"{}"}}],"x":"b"},"logprobs":null,'
        b'"finish_reason":null}]}',  # the text's quotes close it early: other keys follow in the delta
        text_chunk("end", tail=',"logprobs":null,"finish_reason":"stop"}]}'),
        text_chunk("other id", head=HEAD.replace("chatcmpl-1", "chatcmpl-2")),
        text_chunk(
            "usage",
            tail=',"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":1,'
            '"completion_tokens":2,"total_tokens":3}}',
        ),
    ],
)
def test_anything_but_the_next_plain_text_is_decoded(data):
    reader = Reader()
    reader.read(text_chunk(" learned"))
    reader.decodes = 0

    chunk = reader.read(data)

    assert reader.decodes >= 1
    assert chunk == json.loads(data)


def test_a_text_that_closes_its_string_early_is_decoded_as_the_json_it_is():
    """Raw bytes between the template's prefix and suffix that hold a closing quote: the chunk is not the
    template's shape (here the delta has a second key), and the decode says so."""
    reader = Reader()
    reader.read(text_chunk(" learned"))
    data = text_chunk("a").replace(b'"content":"a"', b'"content":"a","refusal":"no"')
    assert data.startswith(HEAD.encode())

    chunk = reader.read(data)

    assert chunk["choices"][0]["delta"] == {"content": "a", "refusal": "no"}


def test_a_control_character_or_bad_utf8_fails_as_the_decode_would():
    for bad in (text_chunk("ok").replace(b"ok", b"o\x01k"), text_chunk("ok").replace(b"ok", b"o\xffk")):
        reader = Reader()
        reader.read(text_chunk(" learned"))
        with pytest.raises(ValueError):
            json.loads(bad)
        with pytest.raises(ValueError):
            reader.read(bad)


@pytest.mark.parametrize(
    "first",
    [
        text_chunk("x", head=HEAD + '"content":"top",'),  # another "content" key: which one is the text?
        text_chunk("x", head=HEAD + '"extra":{"a":1},'),  # a nested value the chunks would share
        text_chunk("x").replace(b'"content"', b'"con\\u0074ent"'),  # the key spelled with an escape
        text_chunk("line\nbreak"),  # learned all the same: the template is its bytes around the text
    ],
)
def test_what_cannot_be_a_template_is_decoded_every_time_and_still_right(first):
    reader = Reader()
    reader.read(first)
    following = first.replace(b'"x"', b'"y"')
    assert reader.read(following) == json.loads(following)


def test_blank_after_the_colon_and_a_template_made_of_a_text_with_escapes():
    head = HEAD.replace(",", ", ").replace('":', '": ')
    reader = Reader()
    reader.read(text_chunk("first\nline", head=head).replace(b'"content":', b'"content": '))
    reader.decodes = 0
    data = text_chunk("plain", head=head).replace(b'"content":', b'"content": ')

    assert reader.read(data) == json.loads(data)
    assert reader.decodes == 0


def test_an_upstream_whose_chunks_always_differ_stops_building_templates():
    reader = Reader()
    for n in range(10):
        data = text_chunk(f" w{n}", head=HEAD.replace("chatcmpl-1", f"chatcmpl-{n}"))
        assert reader.read(data) == json.loads(data)
    assert reader.decodes == 10
    # Four templates were built and none was used: the tenth chunk's layout is not learned, so a chunk that
    # repeats it with another text is decoded too.
    again = text_chunk(" again", head=HEAD.replace("chatcmpl-1", "chatcmpl-9"))
    assert reader.read(again) == json.loads(again)
    assert reader.decodes == 11


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=8))
def test_any_text_reads_as_the_decode_reads_it(texts):
    reader = Reader()
    reader.read(text_chunk(" learned"))
    for text in texts:
        for data in (text_chunk(text), text_chunk(text, ascii_only=False), unescaped_chunk(text)):
            assert_read_as_decoded(reader, data)


REPLY = 'a "quoted" word, a\\ slash, and words after it: café 🙂 one two three four five six seven eight nine'


async def test_a_stream_from_the_upstream_is_decoded_a_few_times_only(fake_upstream):
    """Through the SDK and the real fake upstream: a reply of some thirty chunks, its text exactly, each
    chunk's bytes as sent, and a decode for the first chunks, the finish and the usage only."""
    await assert_streamed_with_four_decodes(fake_upstream, f"[[reply={REPLY}]]")


async def assert_streamed_with_four_decodes(fake_upstream, content: str) -> list:
    """``content`` streamed through the adapter from the fake upstream: REPLY exactly, each chunk's bytes as
    sent, and four decodes (the role chunk, the first text chunk, the finish and the usage chunk; [DONE] is
    not JSON)."""
    adapter = OpenAIAdapter(make_config(fake_upstream))
    try:
        with decodes_counted(openai_adapter) as decodes:
            chunks = [chunk async for chunk in adapter.stream(user(content))]
    finally:
        await adapter.aclose()

    assert len(chunks) > 15
    assert decodes.count == 4, decodes.count
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == REPLY
    for chunk in chunks:
        assert chunk.raw is not None and json.loads(chunk.raw) == chunk
    return chunks


@pytest.mark.parametrize("fault", ["error-event", "cut-6"])
async def test_a_failure_after_text_chunks_still_ends_the_stream(fake_upstream, fault):
    adapter = OpenAIAdapter(make_config(fake_upstream))
    texts = []
    try:
        with pytest.raises(ProviderError):
            async for chunk in adapter.stream(user(f"[[words=30]] [[fault={fault}]]")):
                texts.extend(c["delta"].get("content") for c in chunk["choices"])
    finally:
        await adapter.aclose()
    assert len([text for text in texts if text]) in (2, 6)


# OpenAI's own padding: a top-level "obfuscation" string of random length in every chunk ------------------


def padded(data: bytes, padding: str, *, first: bool = False, raw: bool = False) -> bytes:
    """``data`` with OpenAI's ``obfuscation`` padding, last in the chunk as OpenAI sends it (``first``: first);
    ``raw``: put between the quotes as it stands, JSON or not."""
    encoded = b'"' + padding.encode() + b'"' if raw else json.dumps(padding).encode()
    if first:
        return b'{"obfuscation":' + encoded + b"," + data[1:]
    return data[:-1] + b',"obfuscation":' + encoded + b"}"


PADDINGS = ["ZGF", "lRK2aBv", "kJ", "0wmdEAC", "", "x" * 40]


@pytest.mark.parametrize("first", [False, True], ids=["padding last, as OpenAI sends it", "padding first"])
def test_text_chunks_that_differ_in_their_padding_too_are_read_without_a_decode(first):
    reader = Reader()
    words = [" one", " two", ' a "quoted" word', "\\", " café", "line\nbreak", "", " 🙂"]
    datas = [padded(text_chunk(word), pad, first=first) for word, pad in zip(words, PADDINGS * 2, strict=False)]
    # Paddings with escapes in them (OpenAI's are letters and digits, but the reader does not count on it).
    datas += [padded(text_chunk(" esc"), pad, first=first) for pad in ('a"b', "\\", '\\"', "é", "\n")]
    chunks = [reader.read(data) for data in datas]

    assert reader.decodes == 1
    for data, chunk in zip(datas, chunks, strict=True):
        assert chunk == json.loads(data)
        assert list(chunk) == list(json.loads(data))  # in the upstream's order
        assert chunk.raw == data


@pytest.mark.parametrize(
    "data",
    [
        text_chunk(" unpadded"),
        text_chunk(" null").replace(b"]}", b'],"obfuscation":null}'),
        padded(text_chunk(" first"), "abc", first=True),
        padded(text_chunk(" two"), "abc")[:-1] + b',"x":"y"}',
        padded(text_chunk(" stop", tail=',"logprobs":null,"finish_reason":"stop"}]}'), "abc"),
        padded(text_chunk(" same length", tail=',"logprobz":null,"finish_reason":null}]}'), "abc"),
        padded(text_chunk(" three"), 'a","x":"b', raw=True),  # the padding's quote closes it early
        padded(unescaped_chunk('a"},"x":{"content":"b'), "abc"),  # and the text's
    ],
    ids=[
        "no padding",
        "a null padding",
        "the padding first",
        "a key after it",
        "a finish",
        "a change between the strings",
        "quote",
        "text quote",
    ],
)
def test_a_chunk_without_its_padding_or_with_another_shape_of_it_is_decoded(data):
    reader = Reader()
    reader.read(padded(text_chunk(" learned"), "abc"))
    reader.decodes = 0
    assert reader.read(data) == json.loads(data)
    assert reader.decodes == 1


def test_a_chunk_cut_inside_its_padding_fails_as_the_decode_would():
    """Its bytes between the text and the padding run into the suffix (the padding's opening quote is the
    suffix's): not JSON, and not read as an empty padding."""
    reader = Reader()
    reader.read(padded(text_chunk(" learned"), "abc"))
    data = text_chunk(" cut")[:-1] + b',"obfuscation":"}'
    with pytest.raises(ValueError):
        json.loads(data)
    with pytest.raises(ValueError):
        reader.read(data)


def test_a_padding_key_beside_the_text_too_is_not_learned():
    """Two "obfuscation" keys: the bytes cannot tell which is the padding the chunks vary in."""
    reader = Reader()

    def chunk(text: str, pad: str) -> bytes:
        data = padded(text_chunk(text), pad)
        return data.replace(b'"delta":{', b'"delta":{"obfuscation":' + json.dumps(pad).encode() + b",")

    reader.read(chunk(" a", "pad"))
    following = chunk(" b", "other")
    assert reader.read(following) == json.loads(following)
    assert reader.decodes == 2


def test_a_padding_that_is_not_a_string_stays_in_the_template():
    reader = Reader()
    reader.read(text_chunk(" a").replace(b"]}", b'],"obfuscation":null}'))
    reader.decodes = 0
    same = text_chunk(" b").replace(b"]}", b'],"obfuscation":null}')
    assert reader.read(same) == json.loads(same)
    assert reader.decodes == 0


def test_the_padding_cannot_be_the_texts_key():
    with pytest.raises(ValueError):
        TextChunks(("delta", "text"), padding="text")


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.tuples(st.text(), st.text(), st.booleans()), min_size=1, max_size=6),
    first=st.booleans(),
)
def test_any_text_and_padding_read_as_the_decode_reads_them(pieces, first):
    reader = Reader()
    reader.read(padded(text_chunk(" learned"), "pad", first=first))
    for text, padding, raw in pieces:
        for data in (
            padded(text_chunk(text), padding, first=first, raw=raw),
            padded(unescaped_chunk(text), padding, first=first, raw=raw),
        ):
            assert_read_as_decoded(reader, data)


async def test_a_padded_stream_from_the_upstream_is_decoded_a_few_times_only(fake_upstream):
    """OpenAI's padding, as the fake upstream sends it on ``[[obfuscation=on]]``: every chunk differs in more
    than its text, and still only the first chunks, the finish and the usage are decoded."""
    chunks = await assert_streamed_with_four_decodes(fake_upstream, f"[[reply={REPLY}]] [[obfuscation=on]]")
    assert all(isinstance(chunk.get("obfuscation"), str) for chunk in chunks)
    assert len({chunk["obfuscation"] for chunk in chunks}) > 1


# A streamed tool call: its arguments come a piece a chunk, read as the text is ------------------------------


def arguments_chunk(piece: str, *, index: int = 0) -> bytes:
    """A tool call's next piece of arguments, as OpenAI streams it (after the chunk that names the call)."""
    call = {"index": index, "function": {"arguments": piece}}
    choice = {"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
    return (HEAD + json.dumps({"choices": [choice]}, separators=(",", ":"))[1:]).encode()


def test_a_tool_calls_argument_chunks_after_the_first_are_read_without_a_decode():
    reader = Reader()
    pieces = ['{"', "city", '":"', "Par", "is", ' \\"centre\\"', '"}', "é"]
    datas = [arguments_chunk(piece) for piece in pieces]
    datas += [padded(arguments_chunk(piece), pad) for piece, pad in zip(pieces, PADDINGS, strict=False)]
    chunks = [reader.read(data) for data in datas]

    assert reader.decodes == 2  # the first of each layout, unpadded and padded
    for data, chunk in zip(datas, chunks, strict=True):
        assert chunk == json.loads(data) and chunk.raw == data
    arguments = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[:8])
    assert arguments == "".join(pieces)


def test_text_and_argument_chunks_each_keep_their_own_template():
    """A reply that says something, then calls a tool: each kind is read from its own template, and a second
    call's pieces (another index) are decoded first, then read."""
    reader = Reader()
    datas = [
        text_chunk(" Let"),
        text_chunk(" me"),
        text_chunk(" check."),
        arguments_chunk('{"a":'),
        arguments_chunk("1}"),
        arguments_chunk('{"b":', index=1),
        arguments_chunk("2}", index=1),
        arguments_chunk("", index=1),
    ]
    for data in datas:
        assert_read_as_decoded(reader, data)
    assert reader.decodes == 3  # the first text, the first piece of each call


async def test_a_streamed_tool_call_from_the_upstream_is_decoded_a_few_times_only(fake_upstream):
    """Through the SDK and the real fake upstream (which sends the arguments in three pieces): the chunk that
    names the call and the first piece are decoded, the next pieces read from it."""
    adapter = OpenAIAdapter(make_config(fake_upstream))
    request = {
        **user("Weather in Paris, please, and in some detail"),
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    }
    try:
        with decodes_counted(openai_adapter) as decodes:
            chunks = [chunk async for chunk in adapter.stream(request)]
    finally:
        await adapter.aclose()

    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert len(calls) == 4  # the call named, then its arguments in three pieces
    assert json.loads("".join(call["function"]["arguments"] for call in calls)) == {
        "city": "Weather in Paris, please, and in some detail"
    }
    # The named call, its first piece, the finish and the usage: the other two pieces were read.
    assert decodes.count == len(chunks) - 2, (decodes.count, len(chunks))
    for chunk in chunks:
        assert chunk.raw is not None and json.loads(chunk.raw) == chunk


# Anthropic's text deltas (/v1/messages relayed from an Anthropic provider) ----------------------------------


def text_delta(text: str, index: int = 0) -> bytes:
    return json.dumps(
        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}},
        separators=(",", ":"),
    ).encode()


def test_anthropic_text_deltas_after_the_first_are_read_without_a_decode():
    texts = TextChunks(("delta", "text"), WireEvent)
    first = json.loads(text_delta(" one"))
    texts.learn(first, text_delta(" one"))
    for word in (" two", ' "three"', "line\nbreak", " café"):
        event = texts.read(text_delta(word))
        assert isinstance(event, WireEvent)
        assert event == json.loads(text_delta(word)) and event.raw == text_delta(word)
        assert event.sse() == b"event: content_block_delta\ndata: " + text_delta(word) + b"\n\n"
    assert texts.read(text_delta("next block", index=1)) is None  # another block: decoded, and learned then
    assert (
        texts.read(b'{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{"}}')
        is None
    )


async def anthropic_events(fake_upstream, request: dict) -> tuple[list[WireEvent], Decodes]:
    """The events of a /v1/messages stream through the anthropic SDK and the real fake upstream, and the
    decodes the adapter made."""
    adapter = AnthropicAdapter(make_anthropic_config(fake_upstream))
    model = ResolvedModel(
        id=1,
        name="claude",
        upstream_id="fake-claude-haiku",
        provider=adapter.config,
        input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(1),
        cached_input_per_mtok=None,
        context_window=200_000,
        max_output_tokens=None,
    )
    try:
        with decodes_counted(anthropic_adapter) as decodes:
            events = [event async for event in adapter.messages_stream(request, model)]
    finally:
        await adapter.aclose()
    for event in events:
        assert event.raw is not None and json.loads(event.raw) == event
    return events, decodes


async def test_a_messages_stream_from_the_upstream_is_decoded_a_few_times_only(fake_upstream):
    """Through the anthropic SDK and the real fake upstream: each event as json.loads reads its bytes, the text
    exact, and a decode for the events around the text deltas and the first of them only."""
    request = {"model": "claude", "max_tokens": 200, "messages": [{"role": "user", "content": f"[[reply={REPLY}]]"}]}
    events, decodes = await anthropic_events(fake_upstream, request)

    deltas = [e for e in events if e["type"] == "content_block_delta"]
    assert len(deltas) > 15
    assert decodes.count == len(events) - len(deltas) + 1, decodes.count  # the events around them, the first delta
    assert "".join(e["delta"]["text"] for e in deltas) == REPLY
    for event in events:
        assert event.raw is not None and json.loads(event.raw) == event


def test_a_chunk_without_the_path_to_a_text_is_not_learned():
    texts = TextChunks(("delta", "text"), WireEvent)
    for event in ({"type": "ping"}, {"type": "content_block_delta", "delta": []}, {"delta": {"type": "text_delta"}}):
        texts.learn(event, json.dumps(event).encode())
    assert texts.read(text_delta("x")) is None


async def test_a_tool_calls_input_deltas_from_the_upstream_are_read_after_the_first(fake_upstream):
    """Anthropic streams a tool call's input as ``input_json_delta`` events (three pieces from the fake
    upstream): the first is decoded, the others read from it, and the input is exact."""
    request = {
        "model": "claude",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Weather in Paris, please, and in some detail"}],
        "tools": [{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    }
    events, decodes = await anthropic_events(fake_upstream, request)

    pieces = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert len(pieces) == 3
    assert json.loads("".join(pieces)) == {"city": "Weather in Paris, please, and in some detail"}
    assert decodes.count == len(events) - 2, (decodes.count, len(events))


# A server that says null for none in every delta (vLLM, LM Studio, llama.cpp): relayed without the nulls -----------


def nulled_chunk(text: str, *, ascii_only: bool = True) -> bytes:
    """A text chunk whose delta says ``"role": null``, ``"tool_calls": null`` and ``"function_call": null``."""
    encoded = json.dumps(text, ensure_ascii=ascii_only)
    delta = f'{{"role":null,"content":{encoded},"tool_calls":null,"function_call":null}}'
    return f'{HEAD}"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":null}}]}}'.encode()


def without_nulls(data: bytes) -> dict:
    chunk = json.loads(data)
    delta = chunk["choices"][0]["delta"]
    for name in ("role", "tool_calls", "function_call"):
        if delta.get(name, "") is None:
            del delta[name]
    return chunk


@pytest.mark.parametrize("pad", [None, "last", "first"])
def test_text_chunks_that_say_null_for_none_are_read_without_a_decode_and_relayed_without_the_nulls(pad):
    """Before, the first such chunk was taken as valid and the rest were read from it, all relayed with their nulls;
    left out, each would be decoded and encoded again (11.7 more µs a chunk, in-process). The template learned from
    the first, filled in, relays the rest as that chunk's bytes around each one's own text, spelt as it came."""
    reader = Reader()
    words = [" one", " café", ' a "quoted" word', "\\", "line\nbreak", " 🙂", ""]
    datas = [nulled_chunk(word) for word in words]
    if pad is not None:
        datas = [padded(data, p, first=pad == "first") for data, p in zip(datas, PADDINGS * 2, strict=False)]
    chunks = [reader.read(data) for data in datas]

    assert reader.decodes == 1
    for data, chunk in zip(datas, chunks, strict=True):
        expected = without_nulls(data)
        assert chunk == expected and json.loads(chunk.raw) == expected
        assert list(chunk) == list(expected)  # in the upstream's order
        assert b"null," not in chunk.raw.split(b'"delta":')[1].split(b"}")[0]
        assert json.dumps(expected["choices"][0]["delta"]["content"]).encode() in chunk.raw  # its text as it came
    assert b"caf\\u00e9" in chunks[1].raw  # the upstream's escape, not a text encoded again


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=8))
def test_any_text_of_a_chunk_that_says_null_reads_as_the_decode_and_fill_read_it(texts):
    reader = Reader()
    reader.read(nulled_chunk(" learned"))
    for text in texts:
        for data in (nulled_chunk(text), nulled_chunk(text, ascii_only=False)):
            chunk = reader.read(data)
            assert chunk == without_nulls(data) and json.loads(chunk.raw) == chunk


async def test_a_stream_that_says_null_for_none_is_decoded_a_few_times_only(fake_upstream):
    """Through the SDK and the real fake upstream (``[[nulls=...]]``): the reply's text, each chunk relayed without
    the nulls, of OpenAI's stream schema, and four decodes, as a stream without them."""
    chunks = await assert_streamed_with_four_decodes(
        fake_upstream, f"[[reply={REPLY}]] [[nulls=role,tool_calls,function_call]]"
    )
    for chunk in chunks:
        validate_openai_schema(json.loads(chunk.raw), "CreateChatCompletionStreamResponse")
