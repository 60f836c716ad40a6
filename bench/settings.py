"""Settings for `make bench`: llmhub's production settings, bent only where one machine requires it.

``bench/run.py`` generates ``SECRET_KEY`` and ``FIELD_ENCRYPTION_KEYS``, sets ``ALLOWED_HOSTS`` and points
``DATABASE_URL`` at a throw-away database (PostgreSQL, or SQLite) before anything imports this module; the production
module refuses to start without them, which is the point: the benchmark measures what a deployment runs.
"""

from __future__ import annotations

from llmhub.settings.production import *  # noqa: F403
from llmhub.settings.production import LLMHUB_MIDDLEWARE_FREE_PREFIXES, LOGGING, env

DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
# No TLS terminator in front of the server here; a redirect would answer 301 to every request.
SECURE_SSL_REDIRECT = False
# The upstreams (nginx, the fake provider) listen on 127.0.0.1.
LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
ROOT_URLCONF = "bench.urls"
# The bare view is served by the same lean handler as /v1/ (llmhub/handlers.py): a ceiling measured
# through Django's full middleware stack would not be the ceiling of the /v1 stack.
LLMHUB_MIDDLEWARE_FREE_PREFIXES = [*LLMHUB_MIDDLEWARE_FREE_PREFIXES, "/bare/", "/bare-aiohttp/"]
# Public model name -> upstream base URL, for the bare view (it has no catalog to ask).
BENCH_BARE_UPSTREAMS = env.json("BENCH_BARE_UPSTREAMS", default={})

# A log line per request would measure the terminal, not the gateway.
LOGGING = {**LOGGING, "root": {**LOGGING["root"], "level": "WARNING"}}
