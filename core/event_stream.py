"""A ``text/event-stream`` response whose parts are already framed bytes.

Django's ``StreamingHttpResponse`` hands an async iterator to its handler through two generators of its
own (``streaming_content``'s wrapper, which calls ``make_bytes`` on every part, and ``__aiter__``), and the
handler passes every part through ``chunk_bytes``, a third: three generator frames resumed for every chunk
of every stream. ``EventStreamResponse`` keeps its source as ``events``, and the lean /v1 handler
(``llmhub.handlers.MiddlewareFreeASGIHandler``) sends those bytes as they come; any other handler (the
test client, Django's own) reads it as the ``StreamingHttpResponse`` it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from django.http import StreamingHttpResponse


class EventStreamResponse(StreamingHttpResponse):
    def __init__(self, events: AsyncIterator[bytes]) -> None:
        super().__init__(events, content_type="text/event-stream")
        self.events = events
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"  # nginx: pass each event on as it comes
