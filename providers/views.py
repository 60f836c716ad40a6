"""The web page where a user manages their own provider keys (bring your own key). Its data comes over the
REST API (``/api/provider-keys/``): the page holds no key, and the server renders none."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.roles import CAPABILITIES, Capability, request_role

from .services.credentials import KEY_MAX_LENGTH


@login_required
async def provider_keys_page(request: HttpRequest) -> HttpResponse:
    # The user goes into the context explicitly, as on the other pages: the auth context processor's lazy
    # request.user would query the session synchronously while the template renders.
    user = await request.auser()
    # As the API it talks to: a role without keys of its own (viewer) would get a page whose every call fails.
    if Capability.MANAGE_OWN_KEYS not in CAPABILITIES[await request_role(request, user)]:
        raise PermissionDenied
    # The key field's maxlength is the server's: a browser cuts a longer paste silently.
    context = {"user": user, "page": "provider-keys", "key_max_length": KEY_MAX_LENGTH}
    return render(request, "providers/provider_keys.html", context)
