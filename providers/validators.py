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
        found = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            return []  # unresolvable now; the health check will say so
        found = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    # ::ffff:169.254.169.254 reaches the IPv4 metadata address but is in no IPv4 network: judge the IPv4 inside.
    return [address.ipv4_mapped if getattr(address, "ipv4_mapped", None) else address for address in found]


def validate_provider_url(url: str, *, field: str = "base_url") -> None:
    """Refuse URLs a provider must not point at: other schemes, credentials in the URL, metadata addresses,
    and private or loopback addresses unless ``LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS`` allows them."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # e.g. an unclosed "[" of an IPv6 literal
        hostname = None
    if not hostname or parts.scheme not in ("http", "https"):
        raise ValidationError({field: "Give an http(s) URL with a host."})
    if parts.username or parts.password:
        raise ValidationError({field: "Put credentials in the API key field, not in the URL."})
    allow_private = getattr(settings, "LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS", False)
    for address in _addresses(hostname):
        if any(address in network for network in _BLOCKED_ALWAYS):
            raise ValidationError({field: f"{hostname} resolves to a link-local or unspecified address."})
        # not is_global: also refuses shared (100.64.0.0/10) and other non-routable space, not only RFC 1918.
        if not allow_private and not address.is_global:
            raise ValidationError(
                {field: f"{hostname} is a private address; set LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS to allow it."}
            )
