"""The web pages: the chat and the API keys page. Their data comes over the WebSocket and the REST API."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.templatetags.static import static
from django.views.decorators.cache import cache_control

from accounts.roles import CAPABILITIES, Capability, request_role
from billing.selectors import models_catalog_for

from .consumers import MAX_CONTENT_CHARS


@login_required
async def chat_page(request: HttpRequest, conversation_id: int | None = None) -> HttpResponse:
    # The user goes into the context explicitly: the auth context processor's lazy request.user would
    # query the session synchronously while the template renders, which an async view may not do.
    user = await request.auser()
    if Capability.CHAT not in CAPABILITIES[await request_role(request, user)]:
        # A viewer may not chat (accounts.roles): their page is their usage.
        return HttpResponseRedirect("/usage/")
    # Models the plan does not include are offered too, disabled, as an upsell, and those that need the user's
    # own provider key, with a link to add one: the same list as /api/models/.
    entries = await sync_to_async(models_catalog_for)(user_id=user.pk, key_allowed_model_ids=None)
    picker = [
        {
            "name": entry.model.name,
            "label": entry.model.label or entry.model.name,
            "provider": " · ".join(entry.providers),
            "context_window": entry.model.context_window,
            "reasoning": entry.model.supports_reasoning,
            "locked": entry.locked,
            "locked_reason": entry.locked_reason,
            # "Anthropic" or "Anthropic or Bedrock": whose key of their own would unlock it.
            "own_key_provider": " or ".join(entry.own_key_providers),
        }
        for entry in entries
    ]
    first_usable = next((model for model in picker if not model["locked"]), None)
    context = {
        "user": user,
        "models": picker,
        "usable": first_usable is not None,
        "locked": any(model["locked"] for model in picker),
        "locked_by_plan": any(model["locked_reason"] in ("plan", "key") for model in picker),
        "locked_by_own_key": any(model["locked_reason"] == "own_key" for model in picker),
        # For a page with no usable model: whose key of their own would give them one.
        "own_key_providers": " or ".join(dict.fromkeys(p for entry in entries for p in entry.own_key_providers)),
        "badge": first_usable["provider"] if first_usable else "",
        "conversation_id": conversation_id,
        # The longest message the socket takes: the page refuses a longer one itself, a frame past the server's
        # WebSocket limit closing the socket unanswered (docs/deployment.md).
        "max_content_chars": MAX_CONTENT_CHARS,
        "page": "chat",
    }
    return render(request, "chat/chat.html", context)


@login_required
async def keys_page(request: HttpRequest) -> HttpResponse:
    user = await request.auser()
    # As the API it talks to: a role without keys of its own (viewer) would get a page whose every call fails.
    if Capability.MANAGE_OWN_KEYS not in CAPABILITIES[await request_role(request, user)]:
        raise PermissionDenied
    return render(request, "chat/keys.html", {"user": user, "page": "keys"})


@cache_control(max_age=86400, public=True)
async def favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask for /favicon.ico on pages that link no icon (the admin, the API docs): the static SVG.

    A temporary redirect, cached for a day: a permanent one would outlive a renamed (hashed) static file."""
    return HttpResponseRedirect(static("chat/favicon.svg"))
