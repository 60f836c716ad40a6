"""Outbound URL checks for provider endpoints (SSRF guard)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError

_BLOCKED_ALWAYS = (
    ipaddress.ip_network("169.254.0.0/16"),  # link-local, cloud metadata services live here
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("0.0.0.0/8"),
)


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []  # unresolvable now; the health check will say so
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def validate_provider_url(url: str, *, field: str = "base_url") -> None:
    """Refuse URLs a provider must not point at: other schemes, credentials in the URL, metadata addresses,
    and private or loopback addresses unless ``LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS`` allows them."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError({field: "Give an http(s) URL with a host."})
    if parts.username or parts.password:
        raise ValidationError({field: "Put credentials in the API key field, not in the URL."})
    allow_private = getattr(settings, "LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS", False)
    for address in _addresses(parts.hostname):
        if any(address in network for network in _BLOCKED_ALWAYS):
            raise ValidationError({field: f"{parts.hostname} resolves to a link-local or unspecified address."})
        if not allow_private and (address.is_private or address.is_loopback or address.is_reserved):
            raise ValidationError(
                {field: f"{parts.hostname} is a private address; set LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS to allow it."}
            )
