"""Content-Security-Policy on every answer of the full stack (docs/security.md, "Content-Security-Policy").

The pages load scripts and stylesheets only from llmhub's own static files: no inline script, no inline
event handler, no inline style. A script that slips past the chat's Markdown sanitizing (a model's reply is
the page's untrusted input) is then refused by the browser rather than run. /v1/* (the lean handler,
llmhub/handlers.py) gets no policy: it answers JSON to API clients and runs without middleware.

Django 5.2 has no CSP of its own. django-csp would do, but its middleware is a sync ``MiddlewareMixin``, two
thread hops per request under ASGI, for a policy that needs no nonce: this one is async-native, and its
setting (``LLMHUB_CSP``) has the shape of Django 6.0's ``SECURE_CSP`` so that moving to it is a rename.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponseBase

from .middleware import SyncAndAsyncMiddleware

HEADER = "Content-Security-Policy"


def csp_policy(directives: Mapping[str, Sequence[str]]) -> str:
    """The header's value: ``directive source source; ...`` (a directive without sources stands alone)."""
    return "; ".join(" ".join([name, *sources]) for name, sources in directives.items())


def csp_directives(request: HttpRequest, extend: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """``LLMHUB_CSP`` for this request: ``connect-src`` also names the page's own host under the WebSocket
    scheme (older browsers do not count ws:/wss: as 'self'), and ``extend`` adds sources a view asked for."""
    directives = {name: list(sources) for name, sources in settings.LLMHUB_CSP.items()}
    if "connect-src" in directives:
        try:
            host = request.get_host()
        except DisallowedHost:  # answered 400 already; 'self' alone then
            host = ""
        if host:
            directives["connect-src"].append(f"{'wss' if request.is_secure() else 'ws'}://{host}")
    for name, sources in (extend or {}).items():
        present = directives.setdefault(name, list(directives.get("default-src", [])))
        present.extend(source for source in sources if source not in present)
    return directives


def csp_extend(**directives: Sequence[str]) -> Callable:
    """View decorator: this view's pages allow these sources as well (``style_src=["'unsafe-inline'"]`` for
    style-src), for third-party pages that cannot do without. Says why where it is used."""
    extend = {name.replace("_", "-"): list(sources) for name, sources in directives.items()}

    def decorator(view: Callable) -> Callable:
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
                response = await view(request, *args, **kwargs)
                response.csp_extend = extend
                return response

            return async_wrapped

        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            response = view(request, *args, **kwargs)
            response.csp_extend = extend
            return response

        return wrapped

    return decorator


class ContentSecurityPolicyMiddleware(SyncAndAsyncMiddleware):
    """Sets ``LLMHUB_CSP`` on every response that has none yet. Development's error pages (DEBUG's technical
    404 and 500, inline scripts and styles of their own) are left without one."""

    def call(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        self.apply(request, response)
        return response

    async def acall(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        self.apply(request, response)
        return response

    @staticmethod
    def apply(request: HttpRequest, response: HttpResponseBase) -> None:
        if HEADER in response or (settings.DEBUG and response.status_code in (404, 500)):
            return
        response[HEADER] = csp_policy(csp_directives(request, getattr(response, "csp_extend", None)))
