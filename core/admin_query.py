"""A NUL byte in the query of an admin address is a 400, before any view reads it.

PostgreSQL's text cannot hold U+0000. The admin's lists put a filter's value from the address into their query as it
comes (``?kind=openai%00``), and the database refused it: a ``DataError``, a server error, on nearly every list. No
filter value, search term or page of the admin holds a NUL, so the address is refused as a whole, in one place, for
every list present and to come (Django's own search form refuses a NUL in ``q`` the same way). The rest of the full
stack is left to its views. ``tests/test_admin_nul_query.py``."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponseBadRequest, HttpResponseBase
from django.urls import reverse

from .middleware import SyncAndAsyncMiddleware

REFUSAL = "The address holds a NUL byte (%00): no filter, search or page of the admin takes one."


class AdminNulQueryMiddleware(SyncAndAsyncMiddleware):
    _prefix: str | None = None

    def _refused(self, request: HttpRequest) -> HttpResponseBase | None:
        query = request.META.get("QUERY_STRING", "")
        if "%00" not in query and "\x00" not in query:
            return None  # every request but these: one substring search
        if self._prefix is None:
            self._prefix = reverse("admin:index")
        if not request.path.startswith(self._prefix):
            return None
        if any("\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists()):
            return HttpResponseBadRequest(REFUSAL, content_type="text/plain; charset=utf-8")
        return None

    def call(self, request: HttpRequest) -> HttpResponseBase:
        return self._refused(request) or self.get_response(request)

    async def acall(self, request: HttpRequest) -> HttpResponseBase:
        return self._refused(request) or await self.get_response(request)
