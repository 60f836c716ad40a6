"""The WebSocket origin check.

Channels' ``AllowedHostsOriginValidator`` refuses a handshake without an ``Origin`` header. The check
exists against cross-site WebSocket hijacking, which only a browser can be tricked into, and browsers
always send ``Origin`` on a WebSocket handshake. A program (an SDK, a script with a gateway key) has
no origin to claim, so a missing header is let through while a present one must name an allowed host.
"""

from __future__ import annotations

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings


class BrowserOriginValidator(OriginValidator):
    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        return super().valid_origin(parsed_origin)


def browser_origin_validator(application: Any) -> BrowserOriginValidator:
    """Like ``AllowedHostsOriginValidator``: the allowed origins are ``ALLOWED_HOSTS``."""
    allowed_hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
    return BrowserOriginValidator(application, allowed_hosts)
