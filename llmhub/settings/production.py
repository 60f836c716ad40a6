"""Production settings: no default for a secret, HTTPS assumed, refuse to start when misconfigured.

A missing or malformed secret, or no ``ALLOWED_HOSTS``, stops the process with a single line on stderr
instead of a traceback, so the reason is the first thing an operator reads in the container log. They may be
in the environment or in the ``.env`` file next to ``manage.py``, read first (the environment wins).
"""

from __future__ import annotations

import base64
import binascii
import os
import sys

from llmhub.settings import env_file_read


def _refuse(reason: str) -> None:
    sys.stderr.write(f"llmhub: refusing to start: {reason}\n")
    raise SystemExit(2)


def _check_secrets() -> None:
    secret_key = os.environ.get("SECRET_KEY", "")
    if not secret_key:
        _refuse("SECRET_KEY is not set.")
    if len(secret_key) < 50 or len(set(secret_key)) < 5 or secret_key.startswith("django-insecure"):
        _refuse("SECRET_KEY is too weak (use at least 50 random characters).")
    raw_keys = os.environ.get("FIELD_ENCRYPTION_KEYS", "")
    keys = [k.strip() for k in raw_keys.split(",") if k.strip()]
    if not keys:
        _refuse("FIELD_ENCRYPTION_KEYS is not set (comma-separated Fernet keys, the first one encrypts).")
    for position, key in enumerate(keys, start=1):
        try:
            decoded = base64.urlsafe_b64decode(key.encode())
        except (binascii.Error, ValueError):
            decoded = b""
        if len(decoded) != 32:
            _refuse(f"FIELD_ENCRYPTION_KEYS key #{position} is not a valid Fernet key (32 url-safe base64 bytes).")


def _allowed_hosts() -> list[str]:
    """The host names of ALLOWED_HOSTS, each without the spaces around it (" api.example.com" would match no Host
    header). Without one, Django would start and answer every request (pages, /v1, the WebSocket) 400."""
    hosts = [host.strip() for host in os.environ.get("ALLOWED_HOSTS", "").split(",") if host.strip()]
    if not hosts:
        _refuse("ALLOWED_HOSTS is not set (comma-separated host names llmhub answers to, e.g. llmhub.example.com).")
    return hosts


env_file_read()
_check_secrets()
_hosts = _allowed_hosts()

from llmhub.logging import logging_settings  # noqa: E402

from .base import *  # noqa: E402,F403
from .base import BOUNDED_SMTP_EMAIL_BACKEND, SMTP_EMAIL_BACKEND, env  # noqa: E402

DEBUG = False
# LOGGING: JSON lines, one object per line with its request id, for a log collector (docs/observability.md).
LOGGING = logging_settings(log_format=env("LLMHUB_LOG_FORMAT", default="json"), level=env("LOG_LEVEL", default="INFO"))
ALLOWED_HOSTS = _hosts

# SECURITY
# https://docs.djangoproject.com/en/5.2/howto/deployment/checklist/
# Whether a request came over HTTPS is the scheme the server gives it: uvicorn's --proxy-headers sets it from
# X-Forwarded-Proto, from the proxies of FORWARDED_ALLOW_IPS only (the Dockerfile's command). Django does not read
# the header itself: from any client, a request past the proxy could say "https" (README, "Deploying with Docker
# Compose").
SECURE_PROXY_SSL_HEADER = None
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
# The orchestrator probes the container over plain HTTP (llmhub/probes.py), and Prometheus scrapes it so
# (llmhub/metrics.py: a token or an allowed address; over plain HTTP, prefer the allow-list to a token).
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
# Cookies only over HTTPS. A trial over plain HTTP (SECURE_SSL_REDIRECT=false) needs both off as well: a browser
# keeps no Secure cookie from a plain-HTTP site (localhost aside), so no sign-in form would pass its CSRF check.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=True)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=True)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=60 * 60 * 24 * 30)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
CONN_MAX_AGE = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_MAX_AGE"] = CONN_MAX_AGE  # noqa: F405

# Static files under names carrying a hash of their content (chat/app.<hash>.css, from the manifest collectstatic
# writes): an upgrade's changed files get new URLs, so a browser never keeps an old script or stylesheet, and
# ServeStatic (llmhub/asgi.py) lets browsers cache hashed names for ever. Pages name their files with {% static %}
# only, and render only after a collectstatic (the image's build runs it).
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"},
}

# Providers on private addresses must be allowed explicitly in production.
LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = env.bool("LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS", default=False)

EMAIL_BACKEND = env("EMAIL_BACKEND", default=BOUNDED_SMTP_EMAIL_BACKEND)
if EMAIL_BACKEND == SMTP_EMAIL_BACKEND:
    EMAIL_BACKEND = BOUNDED_SMTP_EMAIL_BACKEND
