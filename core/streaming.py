"""A streamed download whose parts a synchronous iterator makes (rows read from the database, written as CSV:
``csv_lines``).

Django's ``StreamingHttpResponse``, served by an ASGI server (uvicorn, daphne: llmhub in production), reads a
synchronous iterator to its end into one list before it sends the first byte (``__aiter__``: "must consume
synchronous iterators in order to serve them asynchronously"), so an export of years of the audit log is held
whole in the server's memory and the client waits for all of it. ``ThreadedStreamingHttpResponse`` is served a
batch of about ``batch_bytes`` at a time, each read in the request's thread (``sync_to_async``, thread-sensitive:
the thread that ran the view and holds its database connection and cursor), and sent before the next is read.
A WSGI server, or the test client, iterates it as the ``StreamingHttpResponse`` it is.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse

BATCH_BYTES = 64 * 1024


class _Echo:
    """A file for ``csv.writer`` that hands each line back rather than keeping it (Django's streamed CSV recipe)."""

    def write(self, value: str) -> str:
        return value


def csv_lines(header: Sequence[str], rows: Iterable[Iterable[Any]]) -> Iterator[str]:
    """``header`` and then each of ``rows`` as one CSV line (quoted as ``csv.writer`` quotes), made as it is read:
    the parts of a streamed download, none of them held once sent."""
    writer = csv.writer(_Echo())
    yield writer.writerow(header)
    for row in rows:
        yield writer.writerow(row)


def _batch(parts: Iterator[bytes], size: int) -> bytes | None:
    """The next parts of ``parts`` joined, about ``size`` bytes of them; ``None`` once there are no more."""
    taken: list[bytes] = []
    length = 0
    for part in parts:
        taken.append(part)
        length += len(part)
        if length >= size:
            break
    if not taken:
        return None
    return b"".join(taken)


class ThreadedStreamingHttpResponse(StreamingHttpResponse):
    batch_bytes = BATCH_BYTES

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.is_async:
            async for part in super().__aiter__():
                yield part
            return
        parts = iter(self.streaming_content)
        read = sync_to_async(_batch, thread_sensitive=True)
        while (batch := await read(parts, self.batch_bytes)) is not None:
            yield batch
