"""The web pages: the chat and the API keys page. Their data comes over the WebSocket and the REST API."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.templatetags.static import static
from django.views.decorators.cache import cache_control

from .pipeline import caller_from_user, models_for_caller


@login_required
async def chat_page(request: HttpRequest, conversation_id: int | None = None) -> HttpResponse:
    # The user goes into the context explicitly: the auth context processor's lazy request.user would
    # query the session synchronously while the template renders, which an async view may not do.
    user = await request.auser()
    models = await models_for_caller(caller_from_user(user))
    picker = [
        {"name": model.name, "provider": model.provider.name, "context_window": model.context_window}
        for model in models
    ]
    context = {"user": user, "models": picker, "conversation_id": conversation_id, "page": "chat"}
    return render(request, "chat/chat.html", context)


@login_required
async def keys_page(request: HttpRequest) -> HttpResponse:
    user = await request.auser()
    return render(request, "chat/keys.html", {"user": user, "page": "keys"})


@cache_control(max_age=86400, public=True)
async def favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask for /favicon.ico on pages that link no icon (the admin, the API docs): the static SVG.

    A temporary redirect, cached for a day: a permanent one would outlive a renamed (hashed) static file."""
    return HttpResponseRedirect(static("chat/favicon.svg"))
