"""Text chunks read without a JSON decode.

Most chunks of a stream differ from the one before only in their text: an OpenAI-compatible server sends
the same ``id``, ``created``, ``model`` and field layout in each chat chunk around a new
``choices[0].delta.content``, and Anthropic the same ``content_block_delta`` around a new ``delta.text``.
``TextChunks`` keeps the bytes before and after the text of such a chunk, once the adapter has decoded it
(and found it valid, and a plain text chunk of its protocol); a later chunk that starts and ends with the
same bytes, and has between them one JSON string, is that chunk with another text. Its dict is built from
the decoded one with only that string scanned (escapes and all), not the whole chunk: ``json.loads`` was
most of what a relayed chunk cost the adapter. It needs no schema check, and no finish reason, error or
usage looked for: the chunk it was learned from had none.

Anything else (a finish reason, a usage report, a tool call, a text whose quote closes the string early,
an upstream whose chunks vary in more than their text, such as OpenAI's own ``obfuscation`` padding) is
decoded as before, and becomes the template if it is a text chunk. What the relay sends is the upstream's
bytes either way (``WireChunk.raw``).
"""

from __future__ import annotations

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
    positions from the chunk down to the text), each built as a ``kind``. ``learn`` offers it a chunk the
    adapter decoded and judged a plain text chunk; ``read`` returns a later chunk built from the last one
    learned, or None: decode it."""

    __slots__ = ("_builds", "_key", "_kind", "_lp", "_ls", "_path", "_prefix", "_steps", "_suffix", "_text_key", "_top")

    def __init__(self, path: tuple[str | int, ...], kind: type[WireChunk] = WireChunk) -> None:
        self._path = path
        self._text_key = path[-1]
        self._kind = kind
        # The text's key and the quote that opens its value, with the blank JSON allows after the colon.
        self._key = re.compile(re.escape(json.dumps(path[-1]).encode()) + rb":[ \t]*" + b'"')
        self._builds = 0
        self._prefix: bytes | None = None
        self._suffix = b""
        self._lp = self._ls = 0
        # The template: the chunk, and each step down with the container it leads to, to the text's.
        self._top: dict[str, Any] = {}
        self._steps: tuple[tuple[str | int, Any], ...] = ()

    def read(self, data: bytes) -> WireChunk | None:
        prefix = self._prefix
        if prefix is None or not (data.startswith(prefix) and data.endswith(self._suffix)):
            return None
        end = len(data) - self._ls
        if end < self._lp:
            return None
        try:
            text = body = data[self._lp : end].decode()
            if _NOT_PLAIN.search(body) is not None:
                # Escapes to decode: the string alone, which must end where the suffix begins (a quote of
                # its own would close it early, and the chunk would have another shape).
                text, stop = scanstring(body + '"', 0)
                if stop != len(body) + 1:
                    return None
        except ValueError:  # not UTF-8, a bad escape, a control character: decoded the long way, which says so
            return None
        # A copy of each container on the way down (the rest are scalars, shared safely), the text put in.
        chunk = node = self._kind(self._top, data)
        for step, template in self._steps:
            node[step] = node = template.copy()
        node[self._text_key] = text
        return chunk

    def learn(self, chunk: dict[str, Any], raw: bytes) -> None:
        """Take ``chunk`` (decoded from ``raw``) as the template, if its text at ``path`` is a string and
        nothing else in it could be taken for the text or change under it: on the way down, a list holds
        only the step taken, a dict nothing but scalars beside it, and no other key is the text's."""
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
        keys = list(self._key.finditer(raw))
        if len(keys) != 1:
            return
        start = keys[0].end()
        end = _STRING_BODY.match(raw, start).end()  # type: ignore[union-attr]  (it matches the empty string)
        if raw[end : end + 1] != b'"' or scanstring(raw[start:end].decode() + '"', 0)[0] != node[text_key]:
            return
        self._prefix, self._suffix = raw[:start], raw[end:]
        self._lp, self._ls = start, len(raw) - end
        # Copies: the chunk's own containers go on to the relay, and the template must not change with them.
        copies = [item.copy() for item in nodes]
        self._top, self._steps = copies[0], tuple(zip(self._path[:-1], copies[1:], strict=True))


def _scalars_but(node: dict[str, Any], step: str | int) -> bool:
    """Whether every value of ``node`` but the one at ``step`` is a scalar."""
    for key, value in node.items():
        if key != step and not isinstance(value, _SCALARS):
            return False
    return True
