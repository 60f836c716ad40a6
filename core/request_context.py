"""The id of the request being served, for every log line written while it is served.

Set where a request gets its id (the /v1 views, the pipeline's ``completion_start`` for the chat socket's
turns) and read by the log filter (``llmhub.logging.RequestIdFilter``). A ``ContextVar``: each ASGI request
and each chat turn runs in its own task, so ids never cross between concurrent requests, and
``sync_to_async`` carries it into the threads a request's database work runs in."""

from __future__ import annotations

from contextvars import Context, ContextVar, copy_context

request_id_var: ContextVar[str | None] = ContextVar("llmhub_request_id", default=None)


def request_id_bind(request_id: str) -> None:
    """Every line logged from here on in this task (and the tasks it starts) carries ``request_id``."""
    request_id_var.set(request_id)


def request_id_current() -> str | None:
    return request_id_var.get()


def outside_request() -> Context:
    """The current context with no request bound, for a task that outlives the request that happens to
    start it (``loop.create_task(coro, context=outside_request())``): a background writer or flusher created
    lazily by a request's first use would otherwise log every later line under that request's id."""
    context = copy_context()
    context.run(request_id_var.set, None)
    return context
