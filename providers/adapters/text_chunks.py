"""Text chunks read without a JSON decode.

Most chunks of a stream differ from the one before only in their text: an OpenAI-compatible server sends
the same ``id``, ``created``, ``model`` and field layout in each chat chunk around a new
``choices[0].delta.content`` (or, while a tool call streams, the same chunk around its next piece of
``function.arguments``), and Anthropic the same ``content_block_delta`` around a new ``delta.text``.
``TextChunks`` keeps the bytes before and after the text of such a chunk, once the adapter has decoded it
(and found it valid, and a plain text chunk of its protocol); a later chunk that starts and ends with the
same bytes, and has between them one JSON string, is that chunk with another text. Its dict is built from
the decoded one with only that string scanned (escapes and all), not the whole chunk: ``json.loads`` was
most of what a relayed chunk cost the adapter. It needs no schema check, and no finish reason, error or
usage looked for: the chunk it was learned from had none.

OpenAI itself pads every chunk with a top-level ``obfuscation`` string of random characters and length (it
evens out the chunks' sizes; ``stream_options.include_obfuscation: false`` turns it off), so no two of its
chunks are alike but for their text. That key is the ``padding``: a second string the template leaves a
place for, scanned as the text is.

Anything else (a finish reason, a usage report, the chunk that opens a tool call, a text whose quote closes
the string early, an upstream whose chunks vary in more than their text and padding) is decoded as before,
and becomes the template if it is a text chunk. What the relay sends is the upstream's bytes
(``WireChunk.raw``), unless the chunk learned was filled in (``openai_shape``: vLLM's ``"tool_calls": null`` in
every delta, left out): then the bytes it was relayed as around the text, with the later chunk's text (and
padding) between them, as they came. The fill is the same for every chunk alike but for its text, so this is
what filling each in and encoding it again would send, without the decode or the encoding.
"""

from __future__ import annotations

import functools
import json
import re
from json.decoder import scanstring
from typing import Any

from .base import WireChunk

__all__ = ["TextChunks"]

# The end of a JSON string's body (the quote that closes it): what follows is the chunk's suffix.
_STRING_BODY = re.compile(rb'(?:[^"\\]|\\.)*')
# What a text taken as it stands may not hold: a quote (the string would end), a backslash (an escape to
# decode) or a control character (not allowed in a JSON string). One that does is scanned as JSON.
_NOT_PLAIN = re.compile(r'["\\\x00-\x1f]')
_SCALARS = (str, int, float, bool, type(None))
# Templates one stream may build: an upstream whose chunks never match stops paying for new ones.
_MAX_BUILDS = 4


class TextChunks:
    """The text chunks of one stream (see the module's docstring), their text at ``path`` (keys and list
    positions from the chunk down to the text), each built as a ``kind``, with a ``padding`` string at the
    chunk's top level that may change from chunk to chunk. ``learn`` offers it a chunk the adapter decoded
    and judged a plain text chunk; ``read`` returns a later chunk built from the last one learned, or None:
    decode it."""

    __slots__ = (
        "_builds",
        "_key",
        "_kind",
        "_lp",
        "_ls",
        "_middle",
        "_out",
        "_pad",
        "_pad_first",
        "_pad_key",
        "_path",
        "_prefix",
        "_steps",
        "_suffix",
        "_text_key",
        "_top",
    )

    def __init__(
        self, path: tuple[str | int, ...], kind: type[WireChunk] = WireChunk, *, padding: str | None = None
    ) -> None:
        if padding is not None and padding == path[-1]:
            raise ValueError("the padding cannot have the text's name")
        self._path = path
        self._text_key = path[-1]
        self._kind = kind
        self._key = _value_start(path[-1])
        self._pad = padding
        self._pad_key = _value_start(padding) if padding is not None else None
        self._builds = 0
        self._prefix: bytes | None = None
        self._suffix = b""
        self._lp = self._ls = 0
        # With a padding string in the template: the bytes between the first string's end and the second's
        # start (None without), and whether the padding comes first.
        self._middle: bytes | None = None
        self._pad_first = False
        # When the chunk learned was relayed as other bytes than the upstream's (filled in): those bytes before the
        # first string, between the two and after the last (None: relay the upstream's).
        self._out: tuple[bytes, bytes, bytes] | None = None
        # The template: the chunk, and each step down with the container it leads to, to the text's.
        self._top: dict[str, Any] = {}
        self._steps: tuple[tuple[str | int, Any], ...] = ()

    def read(self, data: bytes) -> WireChunk | None:
        prefix = self._prefix
        if prefix is None or not (data.startswith(prefix) and data.endswith(self._suffix)):
            return None
        end = len(data) - self._ls
        start = self._lp
        if end < start:
            return None
        try:
            middle = self._middle
            if middle is None:
                text = _string(data[start:end])
                padding = None
            else:
                # Two strings: the first ends at its closing quote, where the bytes between them must follow.
                stop = _string_end(data, start)
                if stop < 0 or not data.startswith(middle, stop):
                    return None
                second = stop + len(middle)
                if end < second:
                    return None
                first, last = _string(data[start:stop]), _string(data[second:end])
                text, padding = (last, first) if self._pad_first else (first, last)
        except ValueError:  # not UTF-8, a bad escape, a control character: decoded the long way, which says so
            return None
        if text is None or (middle is not None and padding is None):
            return None
        out = self._out
        if out is not None:
            if middle is None:
                data = out[0] + data[start:end] + out[2]
            else:
                data = out[0] + data[start:stop] + out[1] + data[second:end] + out[2]
        # A copy of each container on the way down (the rest are scalars, shared safely), the strings put in.
        chunk = node = self._kind(self._top, data)
        if padding is not None:
            chunk[self._pad] = padding  # type: ignore[index]  (set only with a padding key)
        for step, template in self._steps:
            node[step] = node = template.copy()
        node[self._text_key] = text
        return chunk

    def learn(self, chunk: dict[str, Any], raw: bytes, relayed: bytes | None = None) -> None:
        """Take ``chunk`` (decoded from ``raw``) as the template, if its text at ``path`` is a string and
        nothing else in it could be taken for the text or change under it: on the way down, a list holds
        only the step taken, a dict nothing but scalars beside it, and no other key is the text's (or, when
        the chunk has a padding string, the padding's). ``relayed``: the bytes ``chunk`` is relayed as when they
        are not ``raw`` (it was filled in), which later chunks are relayed as, with their own text."""
        if self._builds >= _MAX_BUILDS:
            return
        nodes: list[Any] = []
        node: Any = chunk
        text_key = self._text_key
        for step in self._path[:-1]:
            if type(node) is list:
                if len(node) != 1 or step != 0:
                    return
            elif type(node) is not dict or step not in node or text_key in node or not _scalars_but(node, step):
                return
            nodes.append(node)
            node = node[step]
        if type(node) is not dict or type(node.get(text_key)) is not str or not _scalars_but(node, text_key):
            return
        nodes.append(node)
        self._builds += 1
        # With no other key of the text's name, the one match is the text's: a string value cannot hold the
        # pattern (its quotes would be escaped). None when the key is spelled with escapes.
        padding = chunk.get(self._pad) if self._pad is not None else None
        found = self._spans(raw, node[text_key], padding)
        if found is None:
            return
        spans, pad_first = found
        out = None
        if relayed is not None:
            found = self._spans(relayed, node[text_key], padding)
            if found is None or found[1] != pad_first:
                return
            relayed_spans = found[0]
            out = (
                relayed[: relayed_spans[0][0]],
                relayed[relayed_spans[0][1] : relayed_spans[1][0]] if len(relayed_spans) == 2 else b"",
                relayed[relayed_spans[-1][1] :],
            )
        self._out = out
        self._prefix, self._suffix = raw[: spans[0][0]], raw[spans[-1][1] :]
        self._lp, self._ls = spans[0][0], len(raw) - spans[-1][1]
        self._middle = raw[spans[0][1] : spans[1][0]] if len(spans) == 2 else None
        self._pad_first = pad_first
        # Copies: the chunk's own containers go on to the relay, and the template must not change with them.
        copies = [item.copy() for item in nodes]
        self._top, self._steps = copies[0], tuple(zip(self._path[:-1], copies[1:], strict=True))

    def _spans(self, data: bytes, text: str, padding: Any) -> tuple[list[tuple[int, int]], bool] | None:
        """Where in ``data`` the text's string body is, and the padding's when the chunk has one, in their order;
        and whether the padding comes first. None when either is not found once."""
        span = _span(self._key, data, text)
        if span is None:
            return None
        spans = [span]
        if type(padding) is str:
            # A padding string elsewhere than at the top (where only scalars sit beside the path) would be a
            # second match of its key: not learned.
            pad = _span(self._pad_key, data, padding)  # type: ignore[arg-type]  (a key when there is a padding)
            if pad is None:
                return None
            spans.append(pad)
        spans.sort()
        return spans, len(spans) == 2 and spans[0] is not span


@functools.lru_cache(maxsize=64)
def _value_start(key: str | int) -> re.Pattern[bytes]:
    """A key and the quote that opens its string value, with the blank JSON allows after the colon. The same
    few keys for every stream (its text's and its padding's): built once, not twice per ``TextChunks`` (a
    stream made two, at 7 µs of ``json.dumps``, ``re.escape`` and the pattern cache's lookup; now 1 µs)."""
    return re.compile(re.escape(json.dumps(key).encode()) + rb":[ \t]*" + b'"')


def _span(key: re.Pattern[bytes], raw: bytes, value: str) -> tuple[int, int] | None:
    """Where in ``raw`` the body of the one string ``key`` opens starts and ends (its closing quote), if the
    key is there once and that string decodes to ``value``; else None."""
    keys = list(key.finditer(raw))
    if len(keys) != 1:
        return None
    start = keys[0].end()
    end = _STRING_BODY.match(raw, start).end()  # type: ignore[union-attr]  (it matches the empty string)
    if raw[end : end + 1] != b'"' or scanstring(raw[start:end].decode() + '"', 0)[0] != value:
        return None
    return start, end


def _string_end(data: bytes, start: int) -> int:
    """The closing quote of the JSON string whose body starts at ``start``, or -1."""
    quote = data.find(b'"', start)
    if quote < 0 or data.find(b"\\", start, quote) < 0:
        return quote
    return _STRING_BODY.match(data, start).end()  # type: ignore[union-attr]  (it matches the empty string)


def _string(body: bytes) -> str | None:
    """The string whose body (between its quotes) is ``body``; None when a quote of its own would close it
    early (the chunk has another shape). ValueError when it is not a string's body: not UTF-8, a bad
    escape, a control character."""
    text = decoded = body.decode()
    if _NOT_PLAIN.search(decoded) is not None:
        # Escapes to decode: the string alone, which must end where its body does.
        text, stop = scanstring(decoded + '"', 0)
        if stop != len(decoded) + 1:
            return None
    return text


def _scalars_but(node: dict[str, Any], step: str | int) -> bool:
    """Whether every value of ``node`` but the one at ``step`` is a scalar."""
    for key, value in node.items():
        if key != step and not isinstance(value, _SCALARS):
            return False
    return True
