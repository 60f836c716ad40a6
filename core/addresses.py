"""The client's address as a throttle key: what counts of a client's attempts are kept per.

One home for it, so that every limit per address (the sign-in and password reset throttles, the audit log's
failed sign-ins and refused tokens) counts the same client the same way."""

from __future__ import annotations

import ipaddress

# An IPv6 host is given a whole /64 (often more): counted address by address, it could take a new one for each
# attempt and never be held back.
IPV6_NETWORK_PREFIX = 64


def address_throttle_key(address: str | None) -> str:
    """An IPv4 address (also when it comes mapped into IPv6) as itself, an IPv6 address as its /64 network;
    anything else (no address, a test client's name) as it is, ``"unknown"`` for none."""
    address = address or "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 4:
        return str(parsed)
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(ipaddress.IPv6Network((parsed, IPV6_NETWORK_PREFIX), strict=False))
