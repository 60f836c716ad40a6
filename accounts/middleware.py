"""``Cache-Control: private, no-store`` on every answer of the full stack to a signed-in user (docs/security.md).

A signed-in page (the chat, the keys, the usage dashboards, /ops/, the experiments, the API's JSON read by them)
shows that user's data: a shared proxy must not keep it for the next person, and the browser must not show it again
from its cache after the sign-out (the back button). A middleware, not a decorator on each view: keyed on who is
signed in, it covers the next page added as well, which a decorator left off would not, with nothing to remember.
A view that says its answer is ``public`` (the favicon's redirect, the same for anyone) keeps its own word.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponseBase
from django.utils.cache import patch_cache_control
from django.utils.functional import LazyObject

from core.exceptions import DATABASE_OUTAGE_ERRORS
from core.middleware import SyncAndAsyncMiddleware


def _signed_in(user: Any) -> bool:
    """Anyone but the anonymous user: a principal without the attribute (a gateway key DRF authenticated) too."""
    return getattr(user, "is_authenticated", True)


def cache_directives(response: HttpResponseBase) -> set[str]:
    """The names of the response's ``Cache-Control`` directives (``max-age=0`` -> ``max-age``)."""
    return {part.split("=", 1)[0].strip().lower() for part in response.get("Cache-Control", "").split(",")} - {""}


def _no_store(response: HttpResponseBase) -> None:
    if "public" not in cache_directives(response):
        patch_cache_control(response, private=True, no_store=True)


class SignedInNoStoreMiddleware(SyncAndAsyncMiddleware):
    """After ``AuthenticationMiddleware``; sync and async capable (``core.middleware``), so that it adds no thread hop.
    The user is the one the answer was made for: the session's (resolved once by the async path, where
    ``AuditContextMiddleware`` has done so already; lazily by the sync one, where the view has mostly read it),
    or one the view set."""

    def call(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        try:
            signed_in = _signed_in(request.user)
        except DATABASE_OUTAGE_ERRORS:
            signed_in = True  # unknown: the answer is kept by no one, which costs a page nothing
        if signed_in:
            _no_store(response)
        return response

    async def acall(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        user = request.__dict__.get("user")
        try:
            # The lazy user would read the session synchronously: auser() is its async twin. One the view set
            # (a sign-in, a sign-out, DRF's authentication of a JWT) is the one the answer was made for.
            signed_in = _signed_in(await request.auser() if user is None or isinstance(user, LazyObject) else user)
        except DATABASE_OUTAGE_ERRORS:
            signed_in = True
        if signed_in:
            _no_store(response)
        return response
