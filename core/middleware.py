"""The one base of llmhub's own middleware: sync and async capable, so that it adds no thread hop.

Django runs a middleware that is not async capable, under ASGI, in a thread (``sync_to_async``), a hop each way for
every page; its ``MiddlewareMixin`` is async capable but runs ``process_request`` and ``process_response`` in a thread
all the same. A subclass of ``SyncAndAsyncMiddleware`` writes its work twice, ``call`` for a synchronous chain (WSGI,
the test ``Client``) and ``acall`` for an asynchronous one (uvicorn, daphne, ``AsyncClient``), and Django hands it the
chain it is in: the async path runs on the event loop, the sync one in the request's thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase


class SyncAndAsyncMiddleware(ABC):
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        # Django checks the instance itself (iscoroutinefunction) to tell which chain it is in.
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self.acall(request)
        return self.call(request)

    @abstractmethod
    def call(self, request: HttpRequest) -> HttpResponseBase:
        """The synchronous chain's work: ``self.get_response(request)`` and what the middleware adds."""

    @abstractmethod
    async def acall(self, request: HttpRequest) -> HttpResponseBase:
        """The asynchronous chain's work: ``await self.get_response(request)`` and what the middleware adds."""
