"""Every answer of the full stack to a signed-in user says ``Cache-Control: private, no-store``
(``accounts.middleware``): a shared proxy must not keep a signed-in page for the next person, nor the browser show it
again after the sign-out. The walk takes every route of the URLconf, so a page added later is in it."""

from __future__ import annotations

import re

import httpx
import pytest
from django.conf import settings
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.urls.resolvers import RoutePattern

from accounts.roles import Role, role_set
from chat.models import Conversation
from experiments.models import Experiment
from tests.factories import ModelFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

# The pages a signed-in user is shown, by their route (the objects they show made for the walk).
PAGES = {
    "",
    "c/<int:conversation_id>/",
    "keys/",
    "usage/",
    "usage/admin/",
    "ops/",
    "ops/data.json",
    "experiments/",
    "experiments/<int:pk>/results/",
    "provider-keys/",
    "accounts/password_change/",
    "accounts/password_change/done/",
    "admin/",
}
# Answers that say themselves they are the same for anyone.
PUBLIC = {"favicon.ico"}
PARAMETER = re.compile(r"<(?:(?P<converter>\w+):)?(?P<name>\w+)>")


def routes(patterns=None, prefix: str = "") -> list[str]:
    """Every route of the full stack as written (``c/<int:conversation_id>/``): /v1/, the probes and /metrics are
    served outside its middleware (``llmhub.handlers``), the admin's own pages are walked as its index."""
    found: list[str] = []
    for entry in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(entry.pattern)
        if any(f"/{route}".startswith(lean) for lean in settings.LLMHUB_MIDDLEWARE_FREE_PREFIXES):
            continue
        if isinstance(entry, URLResolver):
            if route == "admin/":
                found.append(route)
            else:
                found.extend(routes(entry.url_patterns, route))
        else:
            assert isinstance(entry, URLPattern) and isinstance(entry.pattern, RoutePattern), route
            found.append(route)
    return found


def path_of(route: str, ids: dict[str, int]) -> str:
    """``route`` with its parameters filled: an id of a row made for it (1, none, for a route no page needs)."""
    return "/" + PARAMETER.sub(
        lambda match: str(ids.get(match["name"], 1)) if match["converter"] == "int" else "x", route
    )


@pytest.fixture
def signed_in():
    user = UserFactory(username="ada")
    role_set(user, Role.ADMIN)  # every page is hers to see
    conversation = Conversation.objects.create(owner=user, title="mine")
    experiment = Experiment.objects.create(name="walk", model=ModelFactory())
    return user, {"conversation_id": conversation.pk, "pk": experiment.pk}


def cache_control(value: str) -> set[str]:
    return {part.split("=", 1)[0].strip().lower() for part in value.split(",")} - {""}


def answers(get, ids: dict[str, int]) -> dict[str, tuple[int, str, set[str]]]:
    """route -> (status, content type, Cache-Control directives) of a GET of each."""
    found = {}
    for route in routes():
        status, headers = get(path_of(route, ids))
        found[route] = (status, headers.get("Content-Type", ""), cache_control(headers.get("Cache-Control", "")))
    return found


def assert_every_signed_in_answer_is_private_and_not_stored(found: dict[str, tuple[int, str, set[str]]]) -> None:
    assert PAGES <= set(found), PAGES - set(found)
    for route in PAGES - {"ops/data.json"}:
        status, content_type, _ = found[route]
        assert (status, content_type.split(";")[0]) == (200, "text/html"), route
    kept = {
        route: directives for route, (_, _, directives) in found.items() if not {"private", "no-store"} <= directives
    }
    assert set(kept) == PUBLIC, kept
    assert all("public" in found[route][2] for route in PUBLIC)


def test_every_signed_in_answer_is_private_and_not_stored_on_the_asgi_stack(signed_in, llmhub_server):
    """As served (uvicorn, the ASGI handler: the middleware's async path), with the session's cookie."""
    user, ids = signed_in
    client = Client()
    client.force_login(user)
    cookies = {settings.SESSION_COOKIE_NAME: client.cookies[settings.SESSION_COOKIE_NAME].value}
    with httpx.Client(base_url=llmhub_server.url, cookies=cookies, timeout=30) as http:

        def get(path: str):
            reply = http.get(path)
            return reply.status_code, reply.headers

        assert_every_signed_in_answer_is_private_and_not_stored(answers(get, ids))


def test_every_signed_in_answer_is_private_and_not_stored_on_the_sync_stack(signed_in):
    """Through Django's test client (the WSGI handler: the middleware's sync path)."""
    user, ids = signed_in
    client = Client()
    client.force_login(user)

    def get(path: str):
        reply = client.get(path)
        return reply.status_code, reply.headers

    assert_every_signed_in_answer_is_private_and_not_stored(answers(get, ids))


def test_a_page_to_no_one_signed_in_is_left_to_its_view(client):
    """The sign-in page (Django's, never cached by its own word) and a redirect to it are not the middleware's."""
    reply = client.get("/usage/")
    assert reply.status_code == 302 and "no-store" not in cache_control(reply.headers.get("Cache-Control", ""))
