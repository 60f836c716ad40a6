"""The save-time check of provider URLs: the outbound policy (``providers.outbound``), applied early.

It is an early, friendly answer for the admin, not the guard: a name may resolve differently by the
time a request is sent (or not resolve here at all), so every connection is judged again when it is
opened. A name that does not resolve now is therefore accepted, except the cloud metadata names,
which are refused by name here and at connect time."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

from . import outbound


def _addresses(host: str) -> list[outbound.IPAddress]:
    literal = outbound.literal_address(host)
    if literal is not None:
        return [literal]
    try:
        return outbound.resolver.resolve_sync(host)
    except OSError:
        return []  # unresolvable now; judged when a connection is opened


def validate_provider_url(url: str, *, field: str = "base_url") -> None:
    """Refuse URLs a provider must not point at: other schemes, credentials in the URL, metadata hosts and
    addresses, and private or loopback addresses unless ``LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS`` (or
    ``LLMHUB_OUTBOUND_ALLOWED_NETWORKS``) allows them."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # e.g. an unclosed "[" of an IPv6 literal
        hostname = None
    if not hostname or parts.scheme not in ("http", "https"):
        raise ValidationError({field: "Give an http(s) URL with a host."})
    if parts.username or parts.password:
        raise ValidationError({field: "Put credentials in the API key field, not in the URL."})
    try:
        outbound.check_addresses(hostname, _addresses(hostname))
    except outbound.OutboundRefused as exc:
        raise ValidationError({field: exc.message}) from None
