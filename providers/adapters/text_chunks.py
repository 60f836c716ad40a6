"""Text chunks read without a JSON decode.

Most chunks of a chat stream differ from the one before only in their text: an OpenAI-compatible server
sends the same ``id``, ``created``, ``model`` and field layout in each, around a new ``delta.content``.
``TextChunks`` keeps the bytes before and after the text of such a chunk, once the adapter has decoded
it (and checked it against OpenAI's schema); a later chunk that starts and ends with the same bytes, and
has between them one JSON string, is that chunk with another text. Its dict is built from the decoded one
with only that string scanned (escapes and all), not the whole chunk: ``json.loads`` was most of what a
relayed chunk cost the adapter. It needs no schema check, and no finish reason, error or usage looked
for: it has none of them.

Anything else (a finish reason, a usage report, a tool call, a text whose quote closes the string early,
an upstream whose chunks vary in more than their text, such as OpenAI's own ``obfuscation`` padding) is
decoded as before, and becomes the template if it is a text chunk.
What the relay sends is the upstream's bytes either way (``WireChunk.raw``).
"""

from __future__ import annotations

import re
from json.decoder import scanstring
from typing import Any

from .base import WireChunk

__all__ = ["TextChunks"]

# The text's key and the quote that opens its value, with the blank JSON allows after the colon.
_TEXT_KEY = re.compile(rb'"content":[ \t]*"')
# The end of a JSON string's body (the quote that closes it): what follows is the chunk's suffix.
_STRING_BODY = re.compile(rb'(?:[^"\\]|\\.)*')
# What a text taken as it stands may not hold: a quote (the string would end), a backslash (an escape to
# decode) or a control character (not allowed in a JSON string). One that does is scanned as JSON.
_NOT_PLAIN = re.compile(r'["\\\x00-\x1f]')
_SCALARS = (str, int, float, bool, type(None))
# Templates one stream may build: an upstream whose chunks never match stops paying for new ones.
_MAX_BUILDS = 4


def _scalars(mapping: dict[str, Any], *, but: str) -> bool:
    for key, value in mapping.items():
        if key != but and not isinstance(value, _SCALARS):
            return False
    return True


class TextChunks:
    """The text chunks of one stream (see the module's docstring). ``learn`` offers it a chunk decoded and
    found valid; ``read`` returns a later chunk built from the last one learned, or None to decode it."""

    __slots__ = ("_builds", "_choice", "_delta", "_lp", "_ls", "_prefix", "_suffix", "_top")

    def __init__(self) -> None:
        self._builds = 0
        self._prefix: bytes | None = None
        self._suffix = b""
        self._lp = self._ls = 0
        self._top: dict[str, Any] = {}
        self._choice: dict[str, Any] = {}
        self._delta: dict[str, Any] = {}

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
        delta = self._delta.copy()
        delta["content"] = text
        choice = self._choice.copy()
        choice["delta"] = delta
        chunk = WireChunk(self._top, data)
        chunk["choices"] = [choice]
        return chunk

    def learn(self, chunk: dict[str, Any], raw: bytes) -> None:
        """Take ``chunk`` (decoded from ``raw``, and valid as it came) as the template, if it is a text chunk
        of the plainest kind: one choice, with no finish reason, a string ``delta.content`` (the only
        ``content`` key in it), no usage, no error, and nothing but scalars beside the choice, its delta and
        the text."""
        if self._builds >= _MAX_BUILDS:
            return
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1 or chunk.get("usage") is not None or chunk.get("error"):
            return
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason") is not None:
            return
        delta = choice.get("delta")
        if type(delta) is not dict or type(delta.get("content")) is not str:
            return
        if "content" in chunk or "content" in choice:
            return
        if not (_scalars(chunk, but="choices") and _scalars(choice, but="delta") and _scalars(delta, but="")):
            return
        self._builds += 1
        # With no other "content" key, the one match is the text's: a string value cannot hold the pattern
        # (its quotes would be escaped). None when the key is spelled with escapes.
        keys = list(_TEXT_KEY.finditer(raw))
        if len(keys) != 1:
            return
        start = keys[0].end()
        end = _STRING_BODY.match(raw, start).end()  # type: ignore[union-attr]  (it matches the empty string)
        if raw[end : end + 1] != b'"' or scanstring(raw[start:end].decode() + '"', 0)[0] != delta["content"]:
            return
        self._prefix, self._suffix = raw[:start], raw[end:]
        self._lp, self._ls = start, len(raw) - end
        # Copies: the chunk's own dicts go on to the relay, and the template must not change with them.
        self._top, self._choice, self._delta = dict(chunk), dict(choice), dict(delta)
