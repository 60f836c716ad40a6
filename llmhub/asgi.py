"""ASGI entry point: plain Django for HTTP, Channels for WebSocket."""

from __future__ import annotations

import os
from pathlib import Path

import django
from django.apps import apps

from llmhub.logging import drop_query_strings_from_server_logs, websocket_debug_redact

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.base")
# The server's access log would otherwise keep a key a client put in a query string (llmhub/logging.py).
drop_query_strings_from_server_logs()
# Its DEBUG lines would otherwise keep a chat socket's session cookie and the key of its auth message.
websocket_debug_redact()

# Django must be set up before anything imports models (the WebSocket routing does). What follows is
# django.core.asgi.get_asgi_application with llmhub's handler (llmhub/handlers.py). A server imports this module
# before anything has set Django up. A process that has (the tests', where a live server imports it in a fixture)
# keeps its set-up: a second one would only apply LOGGING again, which replaced the root logger's handlers
# (pytest's caplog, live log and log file among them) for the rest of that process.
if not apps.ready:
    django.setup(set_prefix=False)

from llmhub.handlers import FullStackASGIHandler, MiddlewareFreeASGIHandler, PathPrefixRouter  # noqa: E402

django_asgi_app = FullStackASGIHandler()

from django.conf import settings  # noqa: E402

if settings.DEBUG:
    # `make run` serves with the daphne CLI, which (unlike runserver) serves no static files: without
    # this the admin has no CSS. Production serves STATIC_ROOT in front of the app instead.
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    django_asgi_app = ASGIStaticFilesHandler(django_asgi_app)
elif Path(settings.STATIC_ROOT).is_dir():
    # Production: the files `collectstatic` gathered, served by ServeStatic (WhiteNoise's ASGI-native
    # fork) in front of Django, so no sync middleware joins the request path and no proxy is required. Its
    # default test takes a name with a 12-hex-digit hash (production's ManifestStaticFilesStorage) as immutable:
    # cached for ever; a name without one (a page cached before an upgrade still asks for it) for 60 seconds.
    from servestatic import ServeStaticASGI

    django_asgi_app = ServeStaticASGI(django_asgi_app, root=settings.STATIC_ROOT, prefix=settings.STATIC_URL)

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chat.routing import websocket_urlpatterns  # noqa: E402
from chat.security import browser_origin_validator  # noqa: E402

from .lifespan import LifespanMiddleware  # noqa: E402

application = LifespanMiddleware(
    ProtocolTypeRouter(
        {
            "http": PathPrefixRouter(
                prefixes=tuple(settings.LLMHUB_MIDDLEWARE_FREE_PREFIXES),
                lean=MiddlewareFreeASGIHandler(),
                full=django_asgi_app,
            ),
            "websocket": browser_origin_validator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        }
    )
)
